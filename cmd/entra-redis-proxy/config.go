package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/kelseyhightower/envconfig"

	"github.com/entra-redis-proxy/entra-redis-proxy/topology"
)

// envPrefix is the prefix of every setting's environment variable.
const envPrefix = "ENTRA_REDIS_PROXY"

// Config is every setting of the proxy, each read from the environment variable in its envconfig tag;
// `entra-redis-proxy --help` prints this table. The tags hold full names: with a prefix, envconfig would
// also read the bare name (a pod's USERNAME would become the AUTH username).
type Config struct {
	Upstream      string        `envconfig:"ENTRA_REDIS_PROXY_UPSTREAM" desc:"Azure Cache for Redis host[:port] (required unless UPSTREAMS is set); the port defaults to 6380 (Azure Managed Redis listens on 10000)"`
	Upstreams     string        `envconfig:"ENTRA_REDIS_PROXY_UPSTREAMS" desc:"several caches, instead of UPSTREAM and LISTEN: LISTEN=HOST[:PORT],... e.g. 127.0.0.1:6379=a.redis.cache.windows.net,127.0.0.1:6378=b.westeurope.redis.azure.net:10000 (listen ports outside CLUSTER_PORTS); one identity and token for all"`
	Listen        string        `envconfig:"ENTRA_REDIS_PROXY_LISTEN" default:"127.0.0.1:6379" desc:"where apps connect: host:port on loopback, or unix:/path/to/socket (created with mode 0600)"`
	HTTPListen    string        `envconfig:"ENTRA_REDIS_PROXY_HTTP_LISTEN" default:"127.0.0.1:9090" desc:"host:port for /metrics, /startup, /liveness, /readiness; empty turns the HTTP server off"`
	AdminListen   string        `envconfig:"ENTRA_REDIS_PROXY_ADMIN_LISTEN" default:"127.0.0.1:9091" desc:"loopback host:port or unix:/path/to/socket for POST /quitquitquit and /debug/pprof; opened only when QUITQUITQUIT or PPROF is on"`
	Credential    string        `envconfig:"ENTRA_REDIS_PROXY_CREDENTIAL" default:"default" desc:"how to get Entra tokens: default, managed-identity, workload-identity, azure-cli, client-secret, client-certificate (azidentity's AZURE_* variables apply)"`
	MIClientID    string        `envconfig:"ENTRA_REDIS_PROXY_MANAGED_IDENTITY_CLIENT_ID" desc:"client ID of a user-assigned managed identity (credential managed-identity or default)"`
	MIResourceID  string        `envconfig:"ENTRA_REDIS_PROXY_MANAGED_IDENTITY_RESOURCE_ID" desc:"resource ID of a user-assigned managed identity (credential managed-identity); excludes MANAGED_IDENTITY_CLIENT_ID"`
	Scope         string        `envconfig:"ENTRA_REDIS_PROXY_SCOPE" default:"https://redis.azure.com/.default" desc:"OAuth scope of the tokens"`
	Username      string        `envconfig:"ENTRA_REDIS_PROXY_USERNAME" desc:"AUTH username; empty means the oid claim of each token (the identity's object ID)"`
	TLSCAFile     string        `envconfig:"ENTRA_REDIS_PROXY_TLS_CA_FILE" desc:"PEM file of CA certificates trusted in addition to the system roots"`
	TLSServerName string        `envconfig:"ENTRA_REDIS_PROXY_TLS_SERVER_NAME" desc:"name to verify in the upstream certificate and send as SNI; defaults to the upstream host (set it when you connect through a private endpoint IP)"`
	DialTimeout   time.Duration `envconfig:"ENTRA_REDIS_PROXY_DIAL_TIMEOUT" default:"10s" desc:"limit for connecting to, handshaking with and authenticating to the upstream"`
	IdlePing      time.Duration `envconfig:"ENTRA_REDIS_PROXY_UPSTREAM_IDLE_PING" default:"2m" desc:"PING an idle upstream this often so Azure does not close it (Azure closes after ~10m idle); 0 turns it off"`

	MaxConnections    int           `envconfig:"ENTRA_REDIS_PROXY_MAX_CONNECTIONS" default:"0" desc:"most client connections at once; 0 means as many as the open-file limit allows (two descriptors per client, see the start log); a larger value is lowered to that"`
	MinSigtermDelay   time.Duration `envconfig:"ENTRA_REDIS_PROXY_MIN_SIGTERM_DELAY" default:"0s" desc:"after SIGTERM, keep accepting new connections this long"`
	MaxSigtermDelay   time.Duration `envconfig:"ENTRA_REDIS_PROXY_MAX_SIGTERM_DELAY" default:"30s" desc:"after SIGTERM (and MIN_SIGTERM_DELAY), wait this long for open connections to finish before closing them"`
	ExitZeroOnSigterm bool          `envconfig:"ENTRA_REDIS_PROXY_EXIT_ZERO_ON_SIGTERM" default:"false" desc:"exit 0 even when connections had to be cut at shutdown (for Kubernetes Jobs)"`
	QuitQuitQuit      bool          `envconfig:"ENTRA_REDIS_PROXY_QUITQUITQUIT" default:"false" desc:"serve POST /quitquitquit on ADMIN_LISTEN, which starts the same shutdown as SIGTERM"`
	LogFormat         string        `envconfig:"ENTRA_REDIS_PROXY_LOG_FORMAT" default:"text" desc:"text or json"`
	LogLevel          string        `envconfig:"ENTRA_REDIS_PROXY_LOG_LEVEL" default:"info" desc:"debug, info, warn or error"`
	LogConnections    bool          `envconfig:"ENTRA_REDIS_PROXY_LOG_CONNECTIONS" default:"true" desc:"log each client connection's open and close at info; false logs them at debug (lines about tokens, errors and refusals stay)"`
	Pprof             bool          `envconfig:"ENTRA_REDIS_PROXY_PPROF" default:"false" desc:"serve /debug/pprof on ADMIN_LISTEN"`
	ReconnectTimeout  time.Duration `envconfig:"ENTRA_REDIS_PROXY_RECONNECT_TIMEOUT" default:"30s" desc:"when the cache closes an upstream connection with no reply outstanding (failover, patch, restart), dial a new one for at most this long and restore the connection's state, so the app sees nothing; 0 closes the client connection instead"`
	MaintenanceEvents bool          `envconfig:"ENTRA_REDIS_PROXY_MAINTENANCE_EVENTS" default:"true" desc:"listen for maintenance announcements (Azure Cache for Redis: pub/sub channel AzureRedisEvents; Azure Managed Redis: CLIENT MAINT_NOTIFICATIONS pushes; one connection each) and move connections to new upstream connections before a node's maintenance closes them"`

	MaxBulkBytes     ByteSize `envconfig:"ENTRA_REDIS_PROXY_MAX_BULK_BYTES" default:"512MiB" desc:"largest bulk string a client may send (like redis proto-max-bulk-len)"`
	AllowNonLoopback bool     `envconfig:"ENTRA_REDIS_PROXY_ALLOW_NON_LOOPBACK" default:"false" desc:"allow LISTEN on a non-loopback address (every process that can reach it can use your identity)"`
	PoolSize         int      `envconfig:"ENTRA_REDIS_PROXY_POOL_SIZE" default:"4" desc:"authenticated upstream connections kept ready for new clients (a clean client's upstream is reused); 0 turns the pool off"`
	PoolMax          int      `envconfig:"ENTRA_REDIS_PROXY_POOL_MAX" default:"32" desc:"how far the pool grows while clients connect per request (sized from the connect rate, back to POOL_SIZE within seconds when it drops); each counts against the cache's connection limit"`
	LocalPassword    string   `envconfig:"ENTRA_REDIS_PROXY_LOCAL_PASSWORD" desc:"if set, clients must AUTH with this password before other commands"`

	Cluster      string `envconfig:"ENTRA_REDIS_PROXY_CLUSTER" default:"auto" desc:"clustered caches (Managed Redis OSS cluster policy, clustered Premium): auto (asks the cache once its first token is there), on (keeps asking until it is a cluster), off; needs a host:port LISTEN"`
	ClusterPorts string `envconfig:"ENTRA_REDIS_PROXY_CLUSTER_PORTS" default:"6380-6479" desc:"FIRST-LAST: the ports of the local listener of each cluster node, on LISTEN's host (one per node, primaries and replicas, of every cache)"`

	// caches is what validate derives from UPSTREAMS, or from UPSTREAM and LISTEN: the caches served.
	caches []cache
	// listenSet: LISTEN was given (UPSTREAMS names each listen address instead).
	listenSet bool
}

// cache is one cache the proxy serves and where its clients connect.
type cache struct {
	Listen   string // host:port or unix:/path
	Upstream string // host:port
}

// ByteSize is a size in bytes read from strings like 512MiB, 64KB or 1048576.
type ByteSize int64

// Decode implements envconfig.Decoder.
func (b *ByteSize) Decode(s string) error {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1}}
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return fmt.Errorf("%q is not a size (use bytes or a unit such as 64MiB)", s)
	}
	*b = ByteSize(n * mult)
	return nil
}

// loadConfig reads the configuration from the environment and validates it.
func loadConfig() (*Config, error) {
	var c Config
	if err := envconfig.Process("", &c); err != nil {
		return nil, configError(err)
	}
	c.listenSet = os.Getenv(envPrefix+"_LISTEN") != ""
	if err := c.validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

// configError rewrites envconfig's errors so that they name the full variable.
func configError(err error) error {
	var pe *envconfig.ParseError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: invalid value %q: %v", pe.KeyName, pe.Value, pe.Err)
	}
	return err
}

var credentials = []string{"default", "managed-identity", "workload-identity", "azure-cli", "client-secret", "client-certificate"}

func (c *Config) validate() error {
	if err := c.validateCaches(); err != nil {
		return err
	}
	if err := c.validateAdminListen(); err != nil {
		return fmt.Errorf("%s: %v", envName("ADMIN_LISTEN"), err)
	}
	if c.HTTPListen != "" {
		if _, _, err := net.SplitHostPort(c.HTTPListen); err != nil {
			return fmt.Errorf("%s: %q is not host:port", envName("HTTP_LISTEN"), c.HTTPListen)
		}
	}
	known := false
	for _, k := range credentials {
		known = known || c.Credential == k
	}
	if !known {
		return fmt.Errorf("%s: %q is not one of %s", envName("CREDENTIAL"), c.Credential, strings.Join(credentials, ", "))
	}
	if c.MIClientID != "" && c.MIResourceID != "" {
		return fmt.Errorf("%s and %s: set one, not both", envName("MANAGED_IDENTITY_CLIENT_ID"), envName("MANAGED_IDENTITY_RESOURCE_ID"))
	}
	if c.MIResourceID != "" && c.Credential != "managed-identity" {
		return fmt.Errorf("%s: needs %s=managed-identity", envName("MANAGED_IDENTITY_RESOURCE_ID"), envName("CREDENTIAL"))
	}
	if c.Scope == "" {
		return fmt.Errorf("%s: must not be empty", envName("SCOPE"))
	}
	if strings.ContainsAny(c.Username, " \r\n") {
		return fmt.Errorf("%s: must not contain spaces or line breaks", envName("USERNAME"))
	}
	for _, d := range []struct {
		name string
		d    time.Duration
		min  time.Duration
	}{{"DIAL_TIMEOUT", c.DialTimeout, time.Millisecond}, {"UPSTREAM_IDLE_PING", c.IdlePing, 0},
		{"RECONNECT_TIMEOUT", c.ReconnectTimeout, 0},
		{"MIN_SIGTERM_DELAY", c.MinSigtermDelay, 0}, {"MAX_SIGTERM_DELAY", c.MaxSigtermDelay, 0}} {
		if d.d < d.min {
			return fmt.Errorf("%s: %v is too small (at least %v)", envName(d.name), d.d, d.min)
		}
	}
	if c.IdlePing >= 10*time.Minute {
		return fmt.Errorf("%s: %v is not below Azure's 10 minute idle timeout", envName("UPSTREAM_IDLE_PING"), c.IdlePing)
	}
	if c.MaxConnections < 0 {
		return fmt.Errorf("%s: must be 0 (only the open-file limit's) or more", envName("MAX_CONNECTIONS"))
	}
	if c.PoolSize < 0 || c.PoolSize > 10000 {
		return fmt.Errorf("%s: must be between 0 (off) and 10000", envName("POOL_SIZE"))
	}
	if c.PoolMax < 0 || c.PoolMax > 10000 {
		return fmt.Errorf("%s: must be between 0 (the pool keeps POOL_SIZE) and 10000", envName("POOL_MAX"))
	}
	if c.LogFormat != "text" && c.LogFormat != "json" {
		return fmt.Errorf("%s: %q is not text or json", envName("LOG_FORMAT"), c.LogFormat)
	}
	if _, err := parseLevel(c.LogLevel); err != nil {
		return fmt.Errorf("%s: %v", envName("LOG_LEVEL"), err)
	}
	if c.MaxBulkBytes < 1 || c.MaxBulkBytes > 1<<40 {
		return fmt.Errorf("%s: must be between 1B and 1TiB", envName("MAX_BULK_BYTES"))
	}
	return c.validateCluster()
}

// validateCluster checks CLUSTER and CLUSTER_PORTS: node listeners listen on their cache's LISTEN
// host, on ports other than any LISTEN's.
func (c *Config) validateCluster() error {
	if c.Cluster != "auto" && c.Cluster != "on" && c.Cluster != "off" {
		return fmt.Errorf("%s: %q is not auto, on or off", envName("CLUSTER"), c.Cluster)
	}
	first, last, err := topology.ParsePortRange(c.ClusterPorts)
	if err != nil {
		return fmt.Errorf("%s: %v", envName("CLUSTER_PORTS"), err)
	}
	for _, k := range c.caches {
		unix := strings.HasPrefix(k.Listen, "unix:")
		if c.Cluster == "on" && unix {
			return fmt.Errorf("%s: on needs each listen address (%s) as host:port (node listeners listen on its host)", envName("CLUSTER"), k.Listen)
		}
		if _, port, err := net.SplitHostPort(k.Listen); err == nil && !unix {
			if p, _ := strconv.Atoi(port); p >= first && p <= last && c.Cluster != "off" {
				return fmt.Errorf("%s: %s holds the listen port %d (of %s): move the listener out of the range, or the range (CLUSTER_PORTS) away from it", envName("CLUSTER_PORTS"), c.ClusterPorts, p, k.Listen)
			}
		}
	}
	return nil
}

// validateCaches derives c.caches from UPSTREAMS, or from UPSTREAM and LISTEN, and checks each entry.
func (c *Config) validateCaches() error {
	if c.Upstreams == "" {
		host, port, err := splitUpstream(c.Upstream)
		if err != nil {
			return fmt.Errorf("%s: %v (or set %s)", envName("UPSTREAM"), err, envName("UPSTREAMS"))
		}
		c.Upstream = net.JoinHostPort(host, port)
		if err := c.validateListen(c.Listen); err != nil {
			return fmt.Errorf("%s: %v", envName("LISTEN"), err)
		}
		c.caches = []cache{{Listen: c.Listen, Upstream: c.Upstream}}
		return nil
	}
	switch {
	case c.Upstream != "":
		return fmt.Errorf("%s and %s are both set: use one. UPSTREAMS serves several caches (LISTEN=HOST[:PORT],...); "+
			"for one cache unset it, or move UPSTREAM into it with its LISTEN", envName("UPSTREAMS"), envName("UPSTREAM"))
	case c.listenSet:
		return fmt.Errorf("%s: not used with %s, whose entries name their listen addresses (LISTEN=HOST[:PORT]): unset it", envName("LISTEN"), envName("UPSTREAMS"))
	case c.TLSServerName != "":
		return fmt.Errorf("%s: not used with %s, where each cache is verified by its own host name: unset it, and "+
			"reach private endpoints by their privatelink DNS names", envName("TLS_SERVER_NAME"), envName("UPSTREAMS"))
	}
	listens, upstreams := map[string]bool{}, map[string]bool{}
	for _, e := range strings.Split(c.Upstreams, ",") {
		e = strings.TrimSpace(e)
		listen, up, ok := strings.Cut(e, "=")
		if !ok || listen == "" || up == "" {
			return fmt.Errorf("%s: entry %q is not LISTEN=HOST[:PORT] (e.g. 127.0.0.1:6378=mycache.redis.cache.windows.net)", envName("UPSTREAMS"), e)
		}
		host, port, err := splitUpstream(up)
		if err != nil {
			return fmt.Errorf("%s: entry %q: cache %v", envName("UPSTREAMS"), e, err)
		}
		up = net.JoinHostPort(host, port)
		if err := c.validateListen(listen); err != nil {
			return fmt.Errorf("%s: entry %q: listen address %v", envName("UPSTREAMS"), e, err)
		}
		if listens[listen] {
			return fmt.Errorf("%s: listen address %s is in two entries: give each cache its own", envName("UPSTREAMS"), listen)
		}
		if upstreams[up] {
			return fmt.Errorf("%s: cache %s is in two entries: serve it once (several clients can share a listener)", envName("UPSTREAMS"), up)
		}
		listens[listen], upstreams[up] = true, true
		c.caches = append(c.caches, cache{Listen: listen, Upstream: up})
	}
	return nil
}

// splitUpstream splits host[:port], defaulting the port to Azure Cache for Redis's TLS port.
func splitUpstream(s string) (host, port string, err error) {
	if s == "" {
		return "", "", errors.New("required (host[:port] of the cache)")
	}
	host, port, err = net.SplitHostPort(s)
	if err != nil {
		// No port: the whole string is the host (bracketed IPv6 or a name).
		host, port = strings.TrimSuffix(strings.TrimPrefix(s, "["), "]"), "6380"
		if _, perr := netip.ParseAddr(host); strings.Contains(host, ":") && perr != nil {
			return "", "", fmt.Errorf("%q is not host[:port] (write an IPv6 address with a port as [2001:db8::1]:6380)", s)
		}
	}
	if host == "" || strings.ContainsAny(host, "/ ") {
		return "", "", fmt.Errorf("%q is not host[:port]", s)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return "", "", fmt.Errorf("%q has an invalid port", s)
	}
	return host, port, nil
}

// listenHost returns the host of a listen address, or "" for a unix socket (unix:/path).
func listenHost(addr string) (string, error) {
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if path == "" {
			return "", errors.New("unix: needs a socket path")
		}
		return "", nil
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("%q is not host:port or unix:/path", addr)
	}
	return host, nil
}

func (c *Config) validateListen(listen string) error {
	host, err := listenHost(listen)
	if err != nil || strings.HasPrefix(listen, "unix:") {
		return err
	}
	if c.AllowNonLoopback || isLoopbackHost(host) {
		return nil
	}
	return fmt.Errorf("%q is not a loopback address; every process that can reach it could use this identity. Set %s_ALLOW_NON_LOOPBACK=true to allow it", host, envPrefix)
}

// validateAdminListen keeps /quitquitquit and /debug/pprof off the network: anyone who reaches them can stop
// the proxy or profile it. ALLOW_NON_LOOPBACK does not apply. Empty turns them off; enabling either needs it.
func (c *Config) validateAdminListen() error {
	if c.AdminListen == "" {
		if c.QuitQuitQuit || c.Pprof {
			return fmt.Errorf("empty, but %s_QUITQUITQUIT or %s_PPROF is on and needs it", envPrefix, envPrefix)
		}
		return nil
	}
	host, err := listenHost(c.AdminListen)
	if err != nil || strings.HasPrefix(c.AdminListen, "unix:") {
		return err
	}
	if !isLoopbackHost(host) {
		return fmt.Errorf("%q is not a loopback address or unix:/path; whoever reaches it can shut the proxy down or profile it", host)
	}
	return nil
}

// isLoopbackHost reports whether host is localhost or a loopback IP literal (not "", which means every address).
func isLoopbackHost(host string) bool {
	if host == "localhost" {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.IsLoopback()
}

// poolCeiling is the most connections the pool may hold: POOL_MAX, or POOL_SIZE if larger; 0 with the pool off.
func (c *Config) poolCeiling() int {
	if c.PoolSize == 0 {
		return 0
	}
	return max(c.PoolSize, c.PoolMax)
}

// envName is the environment variable of a setting, for messages.
func envName(name string) string { return envPrefix + "_" + name }
