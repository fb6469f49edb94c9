package azurefake

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// mintToken asks the identity endpoint for a token and returns its oid and the token.
func mintToken(t *testing.T, e *Env) (oid, token string) {
	t.Helper()
	q := url.Values{"api-version": {appServiceAPIVersion}, "resource": {"https://redis.azure.com"}}
	status, body, err := tokenRequest(t.Context(), e, e.IdentityHeader, q)
	if err != nil || status != 200 {
		t.Fatalf("token request: %d %q %v", status, body, err)
	}
	var r map[string]string
	if err := json.Unmarshal(body, &r); err != nil {
		t.Fatalf("token body %q: %v", body, err)
	}
	oid, _ = claims(t, r["access_token"])["oid"].(string)
	return oid, r["access_token"]
}

// TestCluster starts the 3+3 cluster and checks what the proxy's cluster tests rely on: TLS
// only, the topology every node reports, a token's user on every node and gone from every
// node at expiry, a cluster client working with the token, and a failover when a primary stops.
func TestCluster(t *testing.T) {
	const lifetime = 3 * time.Second
	start := time.Now()
	e := StartT(t, Options{Cluster: true, TokenLifetime: lifetime})
	t.Logf("cluster of %d nodes formed in %v", len(e.ClusterNodes()), time.Since(start).Round(time.Millisecond))
	nodes := e.ClusterNodes()
	if len(nodes) != 6 || nodes[0] != e.RedisAddr {
		t.Fatalf("ClusterNodes() = %v, want 6 addresses, the first RedisAddr %s", nodes, e.RedisAddr)
	}

	slots, err := e.Admin(t.Context(), "CLUSTER", "SLOTS")
	if err != nil {
		t.Fatal(err)
	}
	ranges := slots.([]any)
	if len(ranges) != 3 {
		t.Fatalf("CLUSTER SLOTS has %d ranges, want 3: %v", len(ranges), slots)
	}
	for _, r := range ranges {
		r := r.([]any)
		if len(r) != 4 { // first, last, primary, replica
			t.Fatalf("slot range %v: want a primary and one replica", r)
		}
		for _, n := range r[2:] {
			ep := n.([]any)
			addr := fmt.Sprintf("%s:%d", ep[0], ep[1])
			if !strings.Contains(strings.Join(nodes, " "), addr) {
				t.Errorf("CLUSTER SLOTS names %s, not one of %v", addr, nodes)
			}
		}
	}

	oid, token := mintToken(t, e)
	for _, addr := range nodes {
		c, err := dialTLS(addr, e.ClientTLSConfig())
		if err != nil {
			t.Fatalf("dial %s: %v", addr, err)
		}
		t.Cleanup(func() { c.c.Close() })
		if got, err := c.do("PING"); err != nil || !strings.HasPrefix(got, "-NOAUTH") {
			t.Fatalf("%s: PING without AUTH: %q, %v; want -NOAUTH (default user off)", addr, got, err)
		}
		if got, err := c.do("AUTH", oid, token); err != nil || got != "+OK" {
			t.Fatalf("%s: AUTH with the token: %q, %v", addr, got, err)
		}
	}

	cc := redis.NewClusterClient(&redis.ClusterOptions{
		Addrs: []string{e.RedisAddr}, Username: oid, Password: token, TLSConfig: e.ClientTLSConfig(),
		DisableIdentity: true, MaxRedirects: 0,
	})
	t.Cleanup(func() { cc.Close() })
	for i := range 100 { // keys spread over the three primaries
		k := fmt.Sprintf("key-%d", i)
		if err := cc.Set(t.Context(), k, i, 0).Err(); err != nil {
			t.Fatalf("cluster client SET %s: %v", k, err)
		}
	}

	// Expiry: the user is gone from every node.
	waitFor(t, lifetime+5*time.Second, "the token's user to be deleted", func() bool { return e.Tokens()[0].Deleted })
	for _, addr := range nodes {
		c, err := dialTLS(addr, e.ClientTLSConfig())
		if err != nil {
			t.Fatalf("dial %s: %v", addr, err)
		}
		got, err := c.do("AUTH", oid, token)
		c.c.Close()
		if err != nil || !strings.HasPrefix(got, "-WRONGPASS") {
			t.Fatalf("%s: AUTH with the expired token: %q, %v; want -WRONGPASS", addr, got, err)
		}
	}

	// A stopped primary's replica takes over; StartRedis brings the old primary back as a replica.
	if err := e.StopNode(nodes[0]); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	promoted := func() bool {
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		role, err := e.AdminAt(ctx, nodes[3], "ROLE")
		return err == nil && role.([]any)[0] == "master"
	}
	waitFor(t, 20*time.Second, "the replica of the stopped primary to be promoted", promoted)
	t.Logf("replica promoted %v after its primary stopped", time.Since(stopped).Round(time.Millisecond))
	if err := e.StartRedis(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got, err := e.AdminAt(t.Context(), nodes[0], "PING"); err != nil || got != "PONG" {
		t.Fatalf("restarted node: PING %v, %v", got, err)
	}
}
