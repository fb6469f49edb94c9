package proxy_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"testing"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// A second dial resumes the first one's TLS session with redis-server, over TLS 1.2 and TLS 1.3 (whose
// session tickets arrive after the handshake and are taken in by the first read, here the AUTH reply).
func TestTLSDialerResumes(t *testing.T) {
	env := azurefake.StartT(t, azurefake.Options{TokenLifetime: 2 * time.Minute})
	for _, tc := range []struct {
		name    string
		version uint16
	}{
		{"TLS 1.2", tls.VersionTLS12},
		{"TLS 1.3", tls.VersionTLS13},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := env.ClientTLSConfig()
			cfg.MinVersion, cfg.MaxVersion = tc.version, tc.version
			d := &proxy.TLSDialer{Addr: env.RedisAddr, Config: cfg}
			for i, wantResumed := range []bool{false, true, true} {
				st := dialAndAuth(t, env, d)
				if st.Version != tc.version {
					t.Fatalf("dial %d: version %x, want %x", i+1, st.Version, tc.version)
				}
				if st.DidResume != wantResumed {
					t.Errorf("dial %d: DidResume %v, want %v", i+1, st.DidResume, wantResumed)
				}
			}
			if cfg.ClientSessionCache != nil {
				t.Errorf("the caller's config was changed")
			}
		})
	}
}

// A config's own session cache is the one used.
func TestTLSDialerKeepsConfigSessionCache(t *testing.T) {
	env := azurefake.StartT(t, azurefake.Options{TokenLifetime: 2 * time.Minute})
	cache := &countingCache{ClientSessionCache: tls.NewLRUClientSessionCache(1)}
	cfg := env.ClientTLSConfig()
	cfg.ClientSessionCache = cache
	d := &proxy.TLSDialer{Addr: env.RedisAddr, Config: cfg}
	dialAndAuth(t, env, d)
	if st := dialAndAuth(t, env, d); !st.DidResume {
		t.Errorf("the second dial did not resume")
	}
	if cache.puts == 0 {
		t.Errorf("the config's session cache was not used")
	}
}

type countingCache struct {
	tls.ClientSessionCache
	puts int
}

func (c *countingCache) Put(key string, cs *tls.ClientSessionState) {
	c.puts++
	c.ClientSessionCache.Put(key, cs)
}

// dialAndAuth dials with d, authenticates as the admin user like the proxy's handshake, and returns the
// connection's TLS state.
func dialAndAuth(t *testing.T, env *azurefake.Env, d *proxy.TLSDialer) tls.ConnectionState {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	user, pass := env.AdminCredentials()
	if _, err := c.Write(resp.AppendCommand(nil, "AUTH", user, pass)); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil || line != "+OK\r\n" {
		t.Fatalf("AUTH: %q, %v", line, err)
	}
	return c.(*tls.Conn).ConnectionState()
}
