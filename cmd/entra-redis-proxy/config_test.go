package main

import (
	"bytes"
	"fmt"
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
)

// setting is one field of Config as the binary reads it.
type setting struct {
	key      string // ENTRA_REDIS_PROXY_X
	tag      string // the envconfig tag
	def      string // the default tag
	desc     string
	required bool
	index    int // field index in Config
}

// settings derives the variables from Config's tags, so that the tests follow the struct.
func settings(t *testing.T) []setting {
	t.Helper()
	var out []setting
	ct := reflect.TypeFor[Config]()
	for i := range ct.NumField() {
		f := ct.Field(i)
		if !f.IsExported() { // derived by validate, not read
			continue
		}
		tag := f.Tag.Get("envconfig")
		if tag == "" {
			t.Fatalf("Config.%s has no envconfig tag: every setting must name its variable", f.Name)
		}
		key := tag
		if !strings.HasPrefix(key, envPrefix+"_") {
			key = envPrefix + "_" + tag
		}
		out = append(out, setting{key: key, tag: strings.TrimPrefix(key, envPrefix+"_"), def: f.Tag.Get("default"),
			desc: f.Tag.Get("desc"), required: f.Tag.Get("required") == "true", index: i})
	}
	return out
}

// cleanEnv unsets every variable of Config, prefixed and bare (envconfig's fallback), for the rest of the test.
func cleanEnv(t *testing.T) {
	t.Helper()
	for _, s := range settings(t) {
		for _, k := range []string{s.key, s.tag} {
			t.Setenv(k, "") // restores the old value after the test
			os.Unsetenv(k)
		}
	}
}

// setEnv sets ENTRA_REDIS_PROXY_<k>=v for each pair.
func setEnv(t *testing.T, env map[string]string) {
	t.Helper()
	for k, v := range env {
		t.Setenv(envPrefix+"_"+k, v)
	}
}

// field returns the value of the Config field read from ENTRA_REDIS_PROXY_<tag>.
func field(t *testing.T, c *Config, tag string) any {
	t.Helper()
	for _, s := range settings(t) {
		if s.tag == tag {
			return reflect.ValueOf(c).Elem().Field(s.index).Interface()
		}
	}
	t.Fatalf("no setting %s", tag)
	return nil
}

const testUpstream = "cache.example.net"

func TestConfigVariables(t *testing.T) {
	type env = map[string]string
	rows := []struct {
		tag       string
		def       any   // the field when the variable is unset
		valid     env   // settings that include this variable with a valid value
		want      any   // the field with valid
		invalid   []env // each is refused with an error naming this variable; none where any value goes
		extraName string
	}{
		{tag: "UPSTREAM", def: nil, valid: env{"UPSTREAM": "c.redis.cache.windows.net:10000"}, want: "c.redis.cache.windows.net:10000",
			invalid: []env{{"UPSTREAM": ""}, {"UPSTREAM": "c:0"}, {"UPSTREAM": "c:65536"}, {"UPSTREAM": "c:port"}, {"UPSTREAM": ":6380"},
				{"UPSTREAM": "a b"}, {"UPSTREAM": "c/x"}, {"UPSTREAM": "c.example.net:6380:1"}}},
		{tag: "UPSTREAMS", def: "", valid: env{"UPSTREAM": "", "UPSTREAMS": "127.0.0.1:6370=a.example.net,127.0.0.1:6371=b.example.net:10000"},
			want:    "127.0.0.1:6370=a.example.net,127.0.0.1:6371=b.example.net:10000",
			invalid: []env{{"UPSTREAMS": "127.0.0.1:6370=a.example.net"}}}, // with UPSTREAM: see TestConfigUpstreams
		{tag: "LISTEN", def: "127.0.0.1:6379", valid: env{"LISTEN": "127.0.0.1:7000"}, want: "127.0.0.1:7000",
			invalid: []env{{"LISTEN": "0.0.0.0:6379"}, {"LISTEN": ":6379"}, {"LISTEN": "6379"}, {"LISTEN": "unix:"}}},
		{tag: "HTTP_LISTEN", def: "127.0.0.1:9090", valid: env{"HTTP_LISTEN": "0.0.0.0:9091"}, want: "0.0.0.0:9091",
			invalid: []env{{"HTTP_LISTEN": "9090"}}},
		{tag: "ADMIN_LISTEN", def: "127.0.0.1:9091", valid: env{"ADMIN_LISTEN": "unix:/run/erp/admin.sock", "QUITQUITQUIT": "true"},
			want: "unix:/run/erp/admin.sock",
			invalid: []env{{"ADMIN_LISTEN": "0.0.0.0:9091"}, {"ADMIN_LISTEN": ":9091"}, {"ADMIN_LISTEN": "10.0.0.4:9091"},
				{"ADMIN_LISTEN": "0.0.0.0:9091", "ALLOW_NON_LOOPBACK": "true"}, {"ADMIN_LISTEN": "9091"}, {"ADMIN_LISTEN": "unix:"},
				{"ADMIN_LISTEN": "", "QUITQUITQUIT": "true"}, {"ADMIN_LISTEN": "", "PPROF": "true"}}},
		{tag: "CREDENTIAL", def: "default", valid: env{"CREDENTIAL": "workload-identity"}, want: "workload-identity",
			invalid: []env{{"CREDENTIAL": "msi"}, {"CREDENTIAL": ""}}},
		{tag: "MANAGED_IDENTITY_CLIENT_ID", def: "", valid: env{"MANAGED_IDENTITY_CLIENT_ID": "11111111-2222-3333-4444-555555555555"},
			want:    "11111111-2222-3333-4444-555555555555",
			invalid: []env{{"MANAGED_IDENTITY_CLIENT_ID": "x", "MANAGED_IDENTITY_RESOURCE_ID": "/subscriptions/s/id", "CREDENTIAL": "managed-identity"}}},
		{tag: "MANAGED_IDENTITY_RESOURCE_ID", def: "", valid: env{"MANAGED_IDENTITY_RESOURCE_ID": "/subscriptions/s/id", "CREDENTIAL": "managed-identity"},
			want: "/subscriptions/s/id", invalid: []env{{"MANAGED_IDENTITY_RESOURCE_ID": "/subscriptions/s/id"}}},
		{tag: "SCOPE", def: "https://redis.azure.com/.default", valid: env{"SCOPE": "api://x/.default"}, want: "api://x/.default",
			invalid: []env{{"SCOPE": ""}}},
		{tag: "USERNAME", def: "", valid: env{"USERNAME": "0f6c0f1e-oid"}, want: "0f6c0f1e-oid",
			invalid: []env{{"USERNAME": "a b"}, {"USERNAME": "a\r\nb"}}},
		{tag: "TLS_CA_FILE", def: "", valid: env{"TLS_CA_FILE": "/etc/ssl/ca.pem"}, want: "/etc/ssl/ca.pem"}, // read (and refused) when serving
		{tag: "TLS_SERVER_NAME", def: "", valid: env{"TLS_SERVER_NAME": "c.redis.cache.windows.net"}, want: "c.redis.cache.windows.net"},
		{tag: "DIAL_TIMEOUT", def: 10 * time.Second, valid: env{"DIAL_TIMEOUT": "3s"}, want: 3 * time.Second,
			invalid: []env{{"DIAL_TIMEOUT": "0s"}, {"DIAL_TIMEOUT": "ten"}}},
		{tag: "UPSTREAM_IDLE_PING", def: 2 * time.Minute, valid: env{"UPSTREAM_IDLE_PING": "0s"}, want: time.Duration(0),
			invalid: []env{{"UPSTREAM_IDLE_PING": "10m"}, {"UPSTREAM_IDLE_PING": "-1s"}, {"UPSTREAM_IDLE_PING": "often"}}},
		{tag: "RECONNECT_TIMEOUT", def: 30 * time.Second, valid: env{"RECONNECT_TIMEOUT": "0s"}, want: time.Duration(0),
			invalid: []env{{"RECONNECT_TIMEOUT": "-1s"}, {"RECONNECT_TIMEOUT": "soon"}}},
		{tag: "MAINTENANCE_EVENTS", def: true, valid: env{"MAINTENANCE_EVENTS": "false"}, want: false,
			invalid: []env{{"MAINTENANCE_EVENTS": "maybe"}}},
		{tag: "MAX_CONNECTIONS", def: 0, valid: env{"MAX_CONNECTIONS": "100"}, want: 100,
			invalid: []env{{"MAX_CONNECTIONS": "-1"}, {"MAX_CONNECTIONS": "many"}}},
		{tag: "MIN_SIGTERM_DELAY", def: time.Duration(0), valid: env{"MIN_SIGTERM_DELAY": "5s"}, want: 5 * time.Second,
			invalid: []env{{"MIN_SIGTERM_DELAY": "-1s"}, {"MIN_SIGTERM_DELAY": "5"}}},
		{tag: "MAX_SIGTERM_DELAY", def: 30 * time.Second, valid: env{"MAX_SIGTERM_DELAY": "0s"}, want: time.Duration(0),
			invalid: []env{{"MAX_SIGTERM_DELAY": "-1s"}}},
		{tag: "EXIT_ZERO_ON_SIGTERM", def: false, valid: env{"EXIT_ZERO_ON_SIGTERM": "true"}, want: true,
			invalid: []env{{"EXIT_ZERO_ON_SIGTERM": "yes"}}},
		{tag: "QUITQUITQUIT", def: false, valid: env{"QUITQUITQUIT": "true"}, want: true, invalid: []env{{"QUITQUITQUIT": "on"}}},
		{tag: "LOG_FORMAT", def: "text", valid: env{"LOG_FORMAT": "json"}, want: "json", invalid: []env{{"LOG_FORMAT": "xml"}}},
		{tag: "LOG_LEVEL", def: "info", valid: env{"LOG_LEVEL": "debug"}, want: "debug", invalid: []env{{"LOG_LEVEL": "loud"}}},
		{tag: "LOG_CONNECTIONS", def: true, valid: env{"LOG_CONNECTIONS": "false"}, want: false, invalid: []env{{"LOG_CONNECTIONS": "some"}}},
		{tag: "POOL_SIZE", def: 4, valid: env{"POOL_SIZE": "0"}, want: 0, invalid: []env{{"POOL_SIZE": "-1"}, {"POOL_SIZE": "many"}}},
		{tag: "POOL_MAX", def: 32, valid: env{"POOL_MAX": "100"}, want: 100, invalid: []env{{"POOL_MAX": "-1"}, {"POOL_MAX": "10001"}}},
		{tag: "PPROF", def: false, valid: env{"PPROF": "true"}, want: true, invalid: []env{{"PPROF": "2"}}},
		{tag: "MAX_BULK_BYTES", def: ByteSize(512 << 20), valid: env{"MAX_BULK_BYTES": "1MB"}, want: ByteSize(1e6),
			invalid: []env{{"MAX_BULK_BYTES": "0"}, {"MAX_BULK_BYTES": "2048GiB"}, {"MAX_BULK_BYTES": "1.5MiB"}}},
		{tag: "ALLOW_NON_LOOPBACK", def: false, valid: env{"ALLOW_NON_LOOPBACK": "true", "LISTEN": "0.0.0.0:6379"}, want: true,
			invalid: []env{{"ALLOW_NON_LOOPBACK": "maybe"}}},
		{tag: "LOCAL_PASSWORD", def: "", valid: env{"LOCAL_PASSWORD": "s3cret"}, want: "s3cret"},
		{tag: "CLUSTER", def: "auto", valid: env{"CLUSTER": "on"}, want: "on",
			invalid: []env{{"CLUSTER": "yes"}, {"CLUSTER": "on", "LISTEN": "unix:/run/redis.sock"}}},
		{tag: "CLUSTER_PORTS", def: "6380-6479", valid: env{"CLUSTER_PORTS": "7000-7005"}, want: "7000-7005",
			invalid: []env{{"CLUSTER_PORTS": "7000"}, {"CLUSTER_PORTS": "7005-7000"}, {"CLUSTER_PORTS": "6300-6400"}}},
	}

	// Every variable of Config has a row, so that a new setting cannot go untested.
	covered := map[string]bool{}
	for _, r := range rows {
		covered[r.tag] = true
	}
	for _, s := range settings(t) {
		if !covered[s.tag] {
			t.Errorf("%s has no row in TestConfigVariables", s.key)
		}
	}

	for _, r := range rows {
		key := envPrefix + "_" + r.tag
		t.Run(r.tag, func(t *testing.T) {
			t.Run("default", func(t *testing.T) {
				cleanEnv(t)
				if r.tag == "UPSTREAM" {
					// Required: unset is an error naming the variable.
					_, err := loadConfig()
					if err == nil || !strings.Contains(err.Error(), key) {
						t.Fatalf("unset %s: err %v, want an error naming %s", key, err, key)
					}
					return
				}
				setEnv(t, env{"UPSTREAM": testUpstream})
				c, err := loadConfig()
				if err != nil {
					t.Fatalf("defaults: %v", err)
				}
				if got := field(t, c, r.tag); !reflect.DeepEqual(got, r.def) {
					t.Errorf("%s unset: %#v, want %#v", key, got, r.def)
				}
			})
			t.Run("valid", func(t *testing.T) {
				cleanEnv(t)
				setEnv(t, env{"UPSTREAM": testUpstream})
				setEnv(t, r.valid)
				c, err := loadConfig()
				if err != nil {
					t.Fatalf("%v: %v", r.valid, err)
				}
				if got := field(t, c, r.tag); !reflect.DeepEqual(got, r.want) {
					t.Errorf("%v: %#v, want %#v", r.valid, got, r.want)
				}
			})
			for _, bad := range r.invalid {
				t.Run("invalid", func(t *testing.T) {
					cleanEnv(t)
					setEnv(t, env{"UPSTREAM": testUpstream})
					setEnv(t, bad)
					_, err := loadConfig()
					if err == nil {
						t.Fatalf("%v accepted", bad)
					}
					if !strings.Contains(err.Error(), key) {
						t.Errorf("%v: error %q does not name %s", bad, err, key)
					}
				})
			}
		})
	}
}

func TestConfigUpstream(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"c.redis.cache.windows.net", "c.redis.cache.windows.net:6380"},
		{"c.redis.cache.windows.net:6380", "c.redis.cache.windows.net:6380"},
		{"c.westeurope.redis.azure.net:10000", "c.westeurope.redis.azure.net:10000"},
		{"10.0.0.4", "10.0.0.4:6380"},
		{"::1", "[::1]:6380"},
		{"[::1]", "[::1]:6380"},
		{"[2001:db8::4]:10000", "[2001:db8::4]:10000"},
		{"2001:db8::4", "[2001:db8::4]:6380"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			cleanEnv(t)
			setEnv(t, map[string]string{"UPSTREAM": tc.in})
			c, err := loadConfig()
			if err != nil {
				t.Fatal(err)
			}
			if c.Upstream != tc.want {
				t.Errorf("UPSTREAM=%s: %q, want %q", tc.in, c.Upstream, tc.want)
			}
		})
	}
}

// TestConfigUpstreams: UPSTREAMS's entries become the caches served, and each way to get it wrong is
// refused with a line that names the variable and says what to do.
func TestConfigUpstreams(t *testing.T) {
	two := "127.0.0.1:6370=a.example.net,127.0.0.1:6371=b.example.net:10000"
	for _, tc := range []struct {
		desc    string
		env     map[string]string
		want    []cache // nil: refused
		wantErr string  // in the error
	}{
		{desc: "UPSTREAM and LISTEN alone", env: map[string]string{"UPSTREAM": "a.example.net", "LISTEN": "127.0.0.1:7000"},
			want: []cache{{Listen: "127.0.0.1:7000", Upstream: "a.example.net:6380"}}},
		{desc: "two caches", env: map[string]string{"UPSTREAMS": two},
			want: []cache{{Listen: "127.0.0.1:6370", Upstream: "a.example.net:6380"}, {Listen: "127.0.0.1:6371", Upstream: "b.example.net:10000"}}},
		{desc: "spaces and a unix socket", env: map[string]string{"UPSTREAMS": " unix:/run/a.sock=a.example.net , 127.0.0.1:6371=[2001:db8::4]:10000"},
			want: []cache{{Listen: "unix:/run/a.sock", Upstream: "a.example.net:6380"}, {Listen: "127.0.0.1:6371", Upstream: "[2001:db8::4]:10000"}}},
		{desc: "neither", env: map[string]string{}, wantErr: "ENTRA_REDIS_PROXY_UPSTREAM: required (host[:port] of the cache) (or set ENTRA_REDIS_PROXY_UPSTREAMS)"},
		{desc: "both", env: map[string]string{"UPSTREAMS": two, "UPSTREAM": "a.example.net"},
			wantErr: "ENTRA_REDIS_PROXY_UPSTREAMS and ENTRA_REDIS_PROXY_UPSTREAM are both set: use one"},
		{desc: "LISTEN with UPSTREAMS", env: map[string]string{"UPSTREAMS": two, "LISTEN": "127.0.0.1:6379"},
			wantErr: "ENTRA_REDIS_PROXY_LISTEN: not used with ENTRA_REDIS_PROXY_UPSTREAMS"},
		{desc: "TLS_SERVER_NAME with UPSTREAMS", env: map[string]string{"UPSTREAMS": two, "TLS_SERVER_NAME": "a.example.net"},
			wantErr: "ENTRA_REDIS_PROXY_TLS_SERVER_NAME: not used with ENTRA_REDIS_PROXY_UPSTREAMS"},
		{desc: "no =", env: map[string]string{"UPSTREAMS": "a.example.net"}, wantErr: `entry "a.example.net" is not LISTEN=HOST[:PORT]`},
		{desc: "no listen", env: map[string]string{"UPSTREAMS": "=a.example.net"}, wantErr: `entry "=a.example.net" is not LISTEN=HOST[:PORT]`},
		{desc: "no cache", env: map[string]string{"UPSTREAMS": "127.0.0.1:6370="}, wantErr: `entry "127.0.0.1:6370=" is not LISTEN=HOST[:PORT]`},
		{desc: "empty entry", env: map[string]string{"UPSTREAMS": two + ","}, wantErr: `entry "" is not LISTEN=HOST[:PORT]`},
		{desc: "bad cache port", env: map[string]string{"UPSTREAMS": "127.0.0.1:6370=a.example.net:0"}, wantErr: `cache "a.example.net:0" has an invalid port`},
		{desc: "listen without host", env: map[string]string{"UPSTREAMS": "6390=a.example.net"}, wantErr: `listen address "6390" is not host:port or unix:/path`},
		{desc: "listen not loopback", env: map[string]string{"UPSTREAMS": "0.0.0.0:6390=a.example.net"},
			wantErr: `listen address "0.0.0.0" is not a loopback address`},
		{desc: "duplicate listen", env: map[string]string{"UPSTREAMS": "127.0.0.1:6370=a.example.net,127.0.0.1:6370=b.example.net"},
			wantErr: "listen address 127.0.0.1:6370 is in two entries"},
		{desc: "duplicate cache", env: map[string]string{"UPSTREAMS": "127.0.0.1:6370=a.example.net,127.0.0.1:6371=a.example.net:6380"},
			wantErr: "cache a.example.net:6380 is in two entries"},
		{desc: "listen port in CLUSTER_PORTS", env: map[string]string{"UPSTREAMS": "127.0.0.1:6370=a.example.net,127.0.0.1:7003=b.example.net", "CLUSTER_PORTS": "7000-7009"},
			wantErr: "ENTRA_REDIS_PROXY_CLUSTER_PORTS: 7000-7009 holds the listen port 7003 (of 127.0.0.1:7003)"},
		{desc: "listen port in CLUSTER_PORTS, cluster off", env: map[string]string{"UPSTREAMS": "127.0.0.1:7003=b.example.net", "CLUSTER_PORTS": "7000-7009", "CLUSTER": "off"},
			want: []cache{{Listen: "127.0.0.1:7003", Upstream: "b.example.net:6380"}}},
		{desc: "CLUSTER=on with a unix socket entry", env: map[string]string{"UPSTREAMS": "unix:/run/a.sock=a.example.net", "CLUSTER": "on"},
			wantErr: "ENTRA_REDIS_PROXY_CLUSTER: on needs each listen address (unix:/run/a.sock) as host:port"},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			cleanEnv(t)
			setEnv(t, tc.env)
			c, err := loadConfig()
			if tc.want == nil {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(c.caches, tc.want) {
				t.Errorf("caches %+v, want %+v", c.caches, tc.want)
			}
		})
	}
}

func TestConfigListenLoopback(t *testing.T) {
	for _, tc := range []struct {
		listen, allow string
		ok            bool
	}{
		{"127.0.0.1:6379", "", true},
		{"127.0.0.2:6379", "", true},
		{"[::1]:6379", "", true},
		{"localhost:6379", "", true},
		{"unix:/run/erp/redis.sock", "", true},
		{"0.0.0.0:6379", "", false},
		{"[::]:6379", "", false},
		{":6379", "", false},
		{"10.0.0.4:6379", "", false},
		{"redis.example:6379", "", false},
		{"0.0.0.0:6379", "false", false},
		{"0.0.0.0:6379", "true", true},
		{"[::]:6379", "true", true},
		{"unix:", "true", false},
	} {
		t.Run(tc.listen+"/allow="+tc.allow, func(t *testing.T) {
			cleanEnv(t)
			env := map[string]string{"UPSTREAM": testUpstream, "LISTEN": tc.listen}
			if tc.allow != "" {
				env["ALLOW_NON_LOOPBACK"] = tc.allow
			}
			setEnv(t, env)
			_, err := loadConfig()
			if tc.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.ok {
				if err == nil {
					t.Fatal("accepted")
				}
				if !strings.Contains(err.Error(), envPrefix+"_LISTEN") {
					t.Errorf("error %q does not name %s_LISTEN", err, envPrefix)
				}
			}
		})
	}
}

// ADMIN_LISTEN serves /quitquitquit and /debug/pprof: loopback or a unix socket only, whatever
// ALLOW_NON_LOOPBACK says; empty only while both are off.
func TestConfigAdminListen(t *testing.T) {
	for _, tc := range []struct {
		admin string
		extra map[string]string
		ok    bool
	}{
		{"127.0.0.1:9091", nil, true},
		{"127.0.0.2:9191", nil, true},
		{"[::1]:9091", nil, true},
		{"localhost:9091", nil, true},
		{"unix:/run/erp/admin.sock", map[string]string{"PPROF": "true"}, true},
		{"", nil, true},
		{"", map[string]string{"QUITQUITQUIT": "true"}, false},
		{"0.0.0.0:9091", nil, false},
		{"[::]:9091", nil, false},
		{":9091", nil, false},
		{"10.0.0.4:9091", nil, false},
		{"admin.example:9091", nil, false},
		{"0.0.0.0:9091", map[string]string{"ALLOW_NON_LOOPBACK": "true", "LISTEN": "0.0.0.0:6379"}, false},
		{"unix:", nil, false},
	} {
		t.Run(fmt.Sprintf("%s/%v", tc.admin, tc.extra), func(t *testing.T) {
			cleanEnv(t)
			setEnv(t, map[string]string{"UPSTREAM": testUpstream, "ADMIN_LISTEN": tc.admin})
			setEnv(t, tc.extra)
			c, err := loadConfig()
			if tc.ok {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if c.AdminListen != tc.admin {
					t.Errorf("AdminListen %q, want %q", c.AdminListen, tc.admin)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
			}
			if !strings.Contains(err.Error(), envPrefix+"_ADMIN_LISTEN") {
				t.Errorf("error %q does not name %s_ADMIN_LISTEN", err, envPrefix)
			}
		})
	}
}

// envconfig falls back to the bare tag (USERNAME, LISTEN, LOG_LEVEL) when the prefixed variable is unset.
// The proxy must read only its own variables: a login shell's USERNAME must never become the AUTH username.
func TestConfigIgnoresUnprefixedVariables(t *testing.T) {
	cleanEnv(t)
	setEnv(t, map[string]string{"UPSTREAM": testUpstream})
	t.Setenv("USERNAME", "alice")
	t.Setenv("LISTEN", "127.0.0.1:1")
	t.Setenv("SCOPE", "api://elsewhere/.default")
	t.Setenv("LOG_LEVEL", "debug")
	c, err := loadConfig()
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	if c.Username != "" || c.Listen != "127.0.0.1:6379" || c.Scope != "https://redis.azure.com/.default" || c.LogLevel != "info" {
		t.Errorf("unprefixed variables were read: username %q, listen %q, scope %q, log level %q",
			c.Username, c.Listen, c.Scope, c.LogLevel)
	}
}

func TestByteSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want ByteSize
		ok   bool
	}{
		{"0", 0, true},
		{"1048576", 1 << 20, true},
		{"10B", 10, true},
		{"64KB", 64_000, true},
		{"64KiB", 64 << 10, true},
		{"512MiB", 512 << 20, true},
		{"3MB", 3_000_000, true},
		{"2GiB", 2 << 30, true},
		{"1GB", 1e9, true},
		{" 1 GiB ", 1 << 30, true},
		{"", 0, false},
		{"MiB", 0, false},
		{"-1", 0, false},
		{"-1KiB", 0, false},
		{"1.5MiB", 0, false},
		{"1TiB", 0, false},
		{"64mib", 0, false},
		{"ten", 0, false},
		{"9223372036854775807KiB", 0, false},
		{"4611686018427387905", 0, false}, // above 1<<62
	} {
		t.Run(tc.in, func(t *testing.T) {
			var b ByteSize
			err := b.Decode(tc.in)
			if tc.ok && (err != nil || b != tc.want) {
				t.Errorf("Decode(%q) = %d, %v; want %d", tc.in, b, err, tc.want)
			}
			if !tc.ok && err == nil {
				t.Errorf("Decode(%q) = %d, want an error", tc.in, b)
			}
		})
	}
}

func TestHelpListsEveryVariable(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"--help"}, &stdout, &stderr); code != exitOK {
		t.Fatalf("--help exited %d", code)
	}
	lines := map[string]string{}
	for _, l := range strings.Split(stdout.String(), "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			lines[f[0]] = l
		}
	}
	for _, s := range settings(t) {
		l, ok := lines[s.key]
		if !ok {
			t.Errorf("--help does not list %s", s.key)
			continue
		}
		f := strings.Fields(l)
		switch {
		case s.required && !strings.Contains(l, "(required)"):
			t.Errorf("--help: %s not marked required: %q", s.key, l)
		case s.def != "" && (len(f) < 2 || f[1] != s.def):
			t.Errorf("--help: %s does not show its default %q: %q", s.key, s.def, l)
		}
		if s.desc == "" || !strings.Contains(l, s.desc) {
			t.Errorf("--help: %s lacks its meaning %q: %q", s.key, s.desc, l)
		}
	}
	if stderr.Len() != 0 {
		t.Errorf("--help wrote to stderr: %q", stderr.String())
	}
}

func TestVersion(t *testing.T) {
	old := version
	version = "v1.2.3-test"
	t.Cleanup(func() { version = old })
	for _, arg := range []string{"--version", "version"} {
		var stdout, stderr bytes.Buffer
		if code := run([]string{arg}, &stdout, &stderr); code != exitOK {
			t.Errorf("%s exited %d", arg, code)
		}
		if got := stdout.String(); got != "entra-redis-proxy v1.2.3-test\n" {
			t.Errorf("%s printed %q", arg, got)
		}
	}
}

func TestUnknownArgument(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run([]string{"--listen=:6379"}, &stdout, &stderr); code != exitConfig {
		t.Errorf("exit %d, want %d", code, exitConfig)
	}
	if stdout.Len() != 0 {
		t.Errorf("stdout %q, want nothing", stdout.String())
	}
	if got := stderr.String(); strings.Count(got, "\n") != 1 || !strings.HasSuffix(got, "\n") || !strings.Contains(got, `"--listen=:6379"`) {
		t.Errorf("stderr %q, want one line naming the argument", got)
	}
}

// An invalid configuration stops the start with one line that names the variable.
func TestInvalidConfigurationOneLine(t *testing.T) {
	for _, tc := range []struct {
		env map[string]string
		key string
	}{
		{map[string]string{}, "UPSTREAM"},
		{map[string]string{"UPSTREAM": testUpstream, "LISTEN": "0.0.0.0:6379"}, "LISTEN"},
		{map[string]string{"UPSTREAM": testUpstream, "ADMIN_LISTEN": "0.0.0.0:9091", "QUITQUITQUIT": "true"}, "ADMIN_LISTEN"},
		{map[string]string{"UPSTREAM": testUpstream, "MAX_BULK_BYTES": "huge"}, "MAX_BULK_BYTES"},
	} {
		t.Run(tc.key, func(t *testing.T) {
			cleanEnv(t)
			setEnv(t, tc.env)
			var stdout, stderr bytes.Buffer
			if code := run(nil, &stdout, &stderr); code != exitConfig {
				t.Errorf("exit %d, want %d", code, exitConfig)
			}
			got := stderr.String()
			if strings.Count(got, "\n") != 1 || !strings.Contains(got, envPrefix+"_"+tc.key) {
				t.Errorf("stderr %q, want one line naming %s_%s", got, envPrefix, tc.key)
			}
		})
	}
}
