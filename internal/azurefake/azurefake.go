// Package azurefake emulates Azure Cache for Redis with Microsoft Entra ID authentication on
// loopback, for end-to-end tests, demos and benchmarks of the proxy.
//
// An Env runs a real redis-server that, like Azure, speaks TLS only and refuses unauthenticated
// connections, next to an App Service-style managed identity endpoint that the real azidentity
// ManagedIdentityCredential uses when IDENTITY_ENDPOINT and IDENTITY_HEADER point at it. Each
// token it issues carries a new random oid; before answering, the endpoint makes that oid an ACL
// user whose password is the token, and deletes the user when the token expires, so Redis closes
// the connections still authenticated with it and refuses the token afterwards (WRONGPASS).
//
// Nothing in the proxy binary imports this package.
package azurefake

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Options configure Start. The zero value is usable.
type Options struct {
	// TokenLifetime is how long issued tokens stay valid; default 1h. SetTokenLifetime changes it later.
	TokenLifetime time.Duration
	// ServerName is the DNS name, besides "localhost" and the IP 127.0.0.1, in the server
	// certificate; default "fakecache.redis.cache.windows.net".
	ServerName string
	// ExpiredCert makes redis-server present a certificate that expired a day ago (signed by the
	// trusted CA), for TLS failure tests.
	ExpiredCert bool
	// Dir is the working directory (certificates, redis.conf, redis.log). Empty means a new
	// temporary directory, removed by Close; a given Dir is left in place.
	Dir string
	// Logger receives one line per token minted and per ACL user deleted; nil discards them.
	// Tokens themselves are never logged.
	Logger *slog.Logger
	// UserRules are ACL rules added after "+@all" to every token's user, as an Azure data access policy
	// restricts an identity: e.g. "-multi", "-client|reply", "resetchannels", "&news.*" (channel
	// rules need 6.2 or newer: see Env.Version).
	UserRules []string
	// RenameCommands are written to redis.conf as "rename-command NAME NEWNAME"; an empty NEWNAME
	// disables the command, e.g. {"RESET": ""} emulates a server without RESET (Redis 6.0,
	// Redis Enterprise). NAME must exist in the server's version (redis-server refuses to start
	// otherwise: see ServerVersion), and ACL, AUTH and PING, which the harness uses, cannot be renamed.
	RenameCommands map[string]string
	// Cluster starts a Redis Cluster instead of one server, like a clustered cache (Azure Managed
	// Redis with the OSS cluster policy, a clustered Premium cache): 3 primaries with one replica
	// each, TLS for clients, replication and the cluster bus; every token's ACL user is created on
	// every node and deleted from every node. RedisAddr is the first primary's (the seed);
	// ClusterNodes lists all.
	Cluster bool
	// Replica starts a replica of the server too, as a Standard or Premium cache has one (replica.go):
	// RunFailover fails over to it.
	Replica bool
}

// Env is a running fake: redis-server plus identity endpoint. Its exported fields are fixed
// after Start. Methods are safe for concurrent use.
type Env struct {
	RedisAddr        string // "127.0.0.1:port" of redis-server's TLS port; the same after StartRedis
	CAFile           string // PEM file of the CA that signed the server certificate
	ServerName       string // DNS name in the server certificate (Options.ServerName)
	IdentityEndpoint string // value for IDENTITY_ENDPOINT
	IdentityHeader   string // value for IDENTITY_HEADER; requests without it get 401
	Dir              string // working directory; redis.log is there

	logger        *slog.Logger
	redisPath     string
	adminPassword string
	tenantID      string         // tid claim of every token
	clientID      string         // client_id of the system-assigned identity
	caPool        *x509.CertPool // trusts CAFile
	untrustedCA   string         // path of a PEM of a CA that signed nothing here
	expiredCert   bool           // Options.ExpiredCert
	userRules     []string       // Options.UserRules
	renames       [][2]string    // Options.RenameCommands, sorted by name
	version       Version        // of redisPath, read by Start
	removeDir     bool
	http          *httptest.Server
	ctx           context.Context // canceled by Close, ends ACL commands of the expirer
	cancel        context.CancelFunc
	closing       chan struct{} // closed by Close: ends the expirer and hanging requests
	kick          chan struct{} // capacity 1: a token was added, the expirer must look again
	wg            sync.WaitGroup
	closeOnce     sync.Once
	closeErr      error

	// redisMu serializes redis-server's lifecycle and ACL changes, so a token is never
	// registered on a server that is being replaced.
	redisMu sync.Mutex
	proc    *redisProc     // nil while stopped; guarded by redisMu
	replica *clusterNode   // Options.Replica's server; guarded by redisMu
	admin   *redis.Client  // admin connection to proc; nil while stopped; guarded by redisMu
	port    int            // TLS port, kept across StopRedis/StartRedis; guarded by redisMu
	nodes   []*clusterNode // with Options.Cluster: every node, fixed after Start; each node's process guarded by redisMu
	sharers []*Env         // Envs that trust this one's tokens (Share); guarded by redisMu

	mu        sync.Mutex // guards the fields below
	lifetime  time.Duration
	fault     Fault
	failEvery int
	failFault Fault
	failCount int
	seq       int
	tokens    []IssuedToken
	stats     Stats
}

// ErrNoRedisServer means redis-server is not on PATH.
var ErrNoRedisServer = errors.New("redis-server not found on PATH; install it with: sudo apt-get install -y redis-server")

// Start starts redis-server and the identity endpoint and returns when both answer. ctx
// bounds the startup only; Close stops everything.
func Start(ctx context.Context, opts Options) (_ *Env, err error) {
	redisPath, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, fmt.Errorf("%w (%v)", ErrNoRedisServer, err)
	}
	version, err := serverVersion(ctx, redisPath)
	if err != nil {
		return nil, err
	}
	renames, err := checkRenames(opts.RenameCommands)
	if err != nil {
		return nil, err
	}
	if opts.TokenLifetime <= 0 {
		opts.TokenLifetime = time.Hour
	}
	if opts.ServerName == "" {
		opts.ServerName = "fakecache.redis.cache.windows.net"
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	e := &Env{
		ServerName:     opts.ServerName,
		IdentityHeader: randomHex(16),
		Dir:            opts.Dir,
		logger:         opts.Logger,
		redisPath:      redisPath,
		adminPassword:  randomHex(24),
		tenantID:       newUUID(),
		clientID:       newUUID(),
		closing:        make(chan struct{}),
		kick:           make(chan struct{}, 1),
		lifetime:       opts.TokenLifetime,
		expiredCert:    opts.ExpiredCert,
		userRules:      opts.UserRules,
		renames:        renames,
		version:        version,
	}
	e.ctx, e.cancel = context.WithCancel(context.Background())
	if e.Dir == "" {
		if e.Dir, err = os.MkdirTemp("", "azurefake-"); err != nil {
			return nil, fmt.Errorf("create working directory: %w", err)
		}
		e.removeDir = true
	}
	defer func() {
		if err != nil {
			_ = e.Close() // the startup error is the one worth reporting
		}
	}()
	if err := e.writeCerts(opts.ExpiredCert); err != nil {
		return nil, err
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/msi/token", e.serveToken) // App Service's path
	e.http = httptest.NewUnstartedServer(mux)
	e.http.Config.ReadHeaderTimeout = 10 * time.Second
	e.http.Start()
	e.IdentityEndpoint = e.http.URL + "/msi/token"

	e.wg.Add(1)
	go e.expireLoop()

	e.redisMu.Lock()
	defer e.redisMu.Unlock()
	if opts.Cluster {
		if err := e.startClusterLocked(ctx); err != nil {
			return nil, err
		}
		return e, nil
	}
	for attempt := 1; ; attempt++ {
		port, perr := freePort()
		if perr != nil {
			return nil, perr
		}
		err = e.startRedisLocked(ctx, port)
		if err == nil || !errors.Is(err, errExitedEarly) || attempt == bindAttempts {
			break
		}
		e.logger.Debug("redis-server exited during startup; retrying on another port", "port", port, "err", err)
	}
	if err == nil && opts.Replica {
		err = e.startReplicaLocked(ctx)
	}
	if err != nil {
		return nil, err
	}
	return e, nil
}

func (e *Env) writeCerts(expired bool) error {
	now := time.Now()
	ca, err := newAuthority("azurefake CA", now)
	if err != nil {
		return err
	}
	other, err := newAuthority("azurefake untrusted CA", now)
	if err != nil {
		return err
	}
	certPEM, keyPEM, err := ca.issueServer(e.ServerName, now, expired)
	if err != nil {
		return err
	}
	e.CAFile, e.untrustedCA = e.path("ca.pem"), e.path("untrusted-ca.pem")
	e.caPool = x509.NewCertPool()
	e.caPool.AddCert(ca.cert)
	return writeFiles(map[string][]byte{
		e.CAFile:                 ca.pem,
		e.untrustedCA:            other.pem,
		e.path("server.pem"):     certPEM,
		e.path("server-key.pem"): keyPEM,
	})
}

// Version returns the version of the redis-server this Env runs, for tests that must choose a
// command the version has (BRPOPLPUSH before 6.2, BLMOVE after).
func (e *Env) Version() Version { return e.version }

// harnessCommands are the commands the harness itself sends; renaming them would lock it out.
var harnessCommands = []string{"ACL", "AUTH", "PING"}

// checkRenames validates Options.RenameCommands and returns them sorted by name. Names are
// plain words, so that redis.conf quoting is exact.
func checkRenames(m map[string]string) ([][2]string, error) {
	word := func(s string) bool {
		for _, r := range s {
			if r <= ' ' || r > '~' || r == '"' || r == '\\' || r == '\'' {
				return false
			}
		}
		return true
	}
	var out [][2]string
	for from, to := range m {
		if from == "" || !word(from) || !word(to) {
			return nil, fmt.Errorf("azurefake: RenameCommands %q -> %q: names must be printable ASCII words", from, to)
		}
		if slices.ContainsFunc(harnessCommands, func(c string) bool { return strings.EqualFold(c, from) }) {
			return nil, fmt.Errorf("azurefake: RenameCommands: %s is used by the harness and cannot be renamed", from)
		}
		out = append(out, [2]string{from, to})
	}
	slices.SortFunc(out, func(a, b [2]string) int { return strings.Compare(a[0], b[0]) })
	return out, nil
}

// UntrustedCAFile returns the path of a PEM file of a CA that did not sign the server
// certificate: a client trusting only it must fail the TLS handshake.
func (e *Env) UntrustedCAFile() string { return e.untrustedCA }

// AdminCredentials returns the user and password of the harness's admin ACL user (for
// redis-cli in demos; tests use Admin).
func (e *Env) AdminCredentials() (user, password string) { return adminUser, e.adminPassword }

// ProxyEnv returns, as KEY=VALUE strings, the environment variables with which the proxy uses
// this Env: its upstream, CA file and TLS server name, the managed-identity credential, and
// IDENTITY_ENDPOINT and IDENTITY_HEADER for azidentity.
func (e *Env) ProxyEnv() []string {
	return []string{
		"ENTRA_REDIS_PROXY_UPSTREAM=" + e.RedisAddr,
		"ENTRA_REDIS_PROXY_TLS_CA_FILE=" + e.CAFile,
		"ENTRA_REDIS_PROXY_TLS_SERVER_NAME=" + e.ServerName,
		"ENTRA_REDIS_PROXY_CREDENTIAL=managed-identity",
		"IDENTITY_ENDPOINT=" + e.IdentityEndpoint,
		"IDENTITY_HEADER=" + e.IdentityHeader,
	}
}

// Admin runs one command as the admin user, e.g. Admin(ctx, "ACL", "LIST"), and returns
// go-redis's reply value (RESP2: string, int64, []any, nil for a null reply with redis.Nil).
func (e *Env) Admin(ctx context.Context, args ...string) (any, error) {
	e.redisMu.Lock()
	c := e.admin
	if e.nodes != nil {
		c = e.nodes[0].admin
	}
	e.redisMu.Unlock()
	if c == nil {
		return nil, errors.New("azurefake: redis-server is stopped (call StartRedis first)")
	}
	a := make([]any, len(args))
	for i, s := range args {
		a[i] = s
	}
	return c.Do(ctx, a...).Result()
}

// StopRedis stops redis-server, or every cluster node, (SIGTERM, which closes every connection)
// and waits for it to exit. Tokens issued meanwhile are recorded and registered by StartRedis.
func (e *Env) StopRedis() error {
	e.redisMu.Lock()
	defer e.redisMu.Unlock()
	if e.nodes != nil {
		return e.stopClusterLocked()
	}
	return e.stopRedisLocked()
}

// StartRedis starts redis-server again on the same port with the same certificates, then,
// since Entra tokens outlive a cache restart, re-creates the ACL users of unexpired tokens.
// It does nothing if redis-server runs. With Options.Cluster it starts every stopped node
// (StopNode, StopRedis) the same way; each rejoins the cluster from its nodes.conf.
// With Options.Replica only the primary starts again: the replica StopRedis stopped stays down.
func (e *Env) StartRedis(ctx context.Context) error {
	e.redisMu.Lock()
	defer e.redisMu.Unlock()
	if e.nodes != nil {
		for _, n := range e.nodes {
			if n.proc != nil {
				continue
			}
			if err := e.startNode(ctx, n); err != nil {
				return fmt.Errorf("restart cluster node %s: %w", n.addr, err)
			}
		}
	} else if e.proc != nil {
		return nil
	} else if err := e.startRedisLocked(ctx, e.port); err != nil {
		return fmt.Errorf("restart redis-server on port %d: %w", e.port, err)
	}
	return e.registerLiveLocked(ctx)
}

// registerLiveLocked creates the ACL users of the unexpired tokens on every server that takes e's
// tokens. The caller holds e.redisMu.
func (e *Env) registerLiveLocked(ctx context.Context) error {
	now := time.Now()
	e.mu.Lock()
	var live []IssuedToken
	for _, t := range e.tokens {
		if !t.Deleted && t.ExpiresOn.After(now) {
			live = append(live, t)
		}
	}
	e.mu.Unlock()
	for _, t := range live {
		if err := e.setUserLocked(ctx, t); err != nil {
			return fmt.Errorf("register token %d: %w", t.Seq, err)
		}
	}
	return nil
}

// Close stops the identity endpoint and redis-server and removes a temporary Dir. It is
// idempotent and returns the first call's result.
func (e *Env) Close() error {
	e.closeOnce.Do(func() {
		close(e.closing)
		e.cancel()
		e.wg.Wait()
		if e.http != nil {
			e.http.Close() // waits for requests in progress; hanging ones end on e.closing
		}
		var errs []error
		errs = append(errs, e.StopRedis())
		if e.removeDir {
			if err := os.RemoveAll(e.Dir); err != nil {
				errs = append(errs, fmt.Errorf("remove %s: %w", e.Dir, err))
			}
		}
		e.closeErr = errors.Join(errs...)
	})
	return e.closeErr
}
