package main

import (
	"bytes"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
)

// TestUpstreams: one process serves two caches (UPSTREAMS), a plain one and a cluster, with one identity:
// go-redis clients on both listeners (a ClusterClient on the cluster's) work across token rotations and
// past the first token's expiry, each cache's logs and metrics carry its upstream, check prints both, and
// the shutdown drains both.
func TestUpstreams(t *testing.T) {
	const lifetime = 6 * time.Second // a rotation every 3 s
	plain := azurefake.StartT(t, azurefake.Options{TokenLifetime: lifetime})
	cluster := azurefake.StartT(t, azurefake.Options{Cluster: true, TokenLifetime: lifetime})
	if err := plain.Share(t.Context(), cluster); err != nil { // Entra tokens for Redis are not per cache
		t.Fatal(err)
	}
	var cas []byte
	for _, f := range []string{plain.CAFile, cluster.CAFile} {
		pem, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		cas = append(cas, pem...)
	}
	caFile := filepath.Join(t.TempDir(), "cas.pem")
	if err := os.WriteFile(caFile, cas, 0o600); err != nil {
		t.Fatal(err)
	}
	first, err := azurefake.FreePortRange(6)
	if err != nil {
		t.Fatal(err)
	}
	listenA, listenB := freeAddr(t), freeAddr(t)
	p := startProxy(t, plain, map[string]string{
		"UPSTREAM": "", "LISTEN": "", "TLS_SERVER_NAME": "", "TLS_CA_FILE": caFile, "LOG_LEVEL": "info",
		"UPSTREAMS":     listenA + "=" + plain.RedisAddr + "," + listenB + "=" + cluster.RedisAddr,
		"CLUSTER_PORTS": strconv.Itoa(first) + "-" + strconv.Itoa(first+5),
	})
	p.awaitStarted()
	p.awaitLog("cluster mode: one local listener per node", 30*time.Second)
	p.awaitLog("the cache is not a cluster: serving it as one endpoint", 10*time.Second)
	for _, up := range []string{plain.RedisAddr, cluster.RedisAddr} {
		if l := p.logLines("upstream=" + up); len(l) == 0 {
			t.Errorf("no log line carries upstream=%s", up)
		}
	}
	if l := p.logLines("cluster mode: one local listener per node"); len(l) != 1 || !strings.Contains(l[0], "upstream="+cluster.RedisAddr) {
		t.Errorf("the cluster's detection line does not name its cache: %q", l)
	}

	ctx := t.Context()
	a := redis.NewClient(&redis.Options{Addr: listenA, PoolSize: 1, MaxRetries: -1, ReadTimeout: 10 * time.Second})
	t.Cleanup(func() { a.Close() })
	b := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{listenB}, MaxRetries: -1, ReadTimeout: 10 * time.Second})
	t.Cleanup(func() { b.Close() })
	// Until two rotations happened and the first token expired (its ACL user deleted on both caches):
	// every command on the same connections succeeds.
	ops := 0
	for deadline := time.Now().Add(30 * time.Second); ; ops++ {
		k := "k" + strconv.Itoa(ops%100)
		if err := setGet(ctx, a, k, k); err != nil {
			t.Fatalf("plain cache, operation %d: %v", ops, err)
		}
		if err := setGet(ctx, b, k, k); err != nil {
			t.Fatalf("cluster, operation %d: %v", ops, err)
		}
		toks := plain.Tokens()
		if len(toks) >= 3 && toks[0].Deleted {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no two rotations and an expiry within 30 s: %d tokens", len(toks))
		}
	}
	t.Logf("%d operations on each cache across %d tokens", ops+1, len(plain.Tokens()))
	if v, ok := p.metric(`entra_redis_proxy_reauths_total{result="error"}`); !ok || v != 0 {
		t.Errorf("reauths_total{error} = %v (found %v), want 0", v, ok)
	}

	for series, want := range map[string]float64{
		`entra_redis_proxy_listener_client_connections{listener="listen",upstream="` + plain.RedisAddr + `"}`:                                       1,
		`entra_redis_proxy_cluster_node_listeners{state="open",upstream="` + cluster.RedisAddr + `"}`:                                               6,
		`entra_redis_proxy_cluster_topology_refreshes_total{reason="detect",result="ok",upstream="` + cluster.RedisAddr + `"}`:                      1,
		`entra_redis_proxy_listener_client_connections_accepted_total{listener="` + strconv.Itoa(first) + `",upstream="` + cluster.RedisAddr + `"}`: 1,
	} {
		if v, ok := p.metric(series); !ok || v != want {
			t.Errorf("%s = %v (found %v), want %v", series, v, ok, want)
		}
	}
	if code, body := p.get("/readiness"); code != http.StatusOK {
		t.Errorf("/readiness with both caches reachable: %d %q", code, body)
	}

	var stdout, stderr bytes.Buffer
	if code := run([]string{"check"}, &stdout, &stderr); code != exitOK {
		t.Fatalf("check: exit %d\n%s%s", code, stdout.String(), stderr.String())
	}
	out := stdout.String()
	for _, want := range []string{
		"ok      cache          " + listenA + " -> " + plain.RedisAddr + "\n",
		"ok      upstream       TLS to " + plain.RedisAddr + " as 127.0.0.1, AUTH and PING answered",
		"ok      cluster        not a cluster: served as one endpoint\n",
		"ok      cache          " + listenB + " -> " + cluster.RedisAddr + "\n",
		"ok      upstream       TLS to " + cluster.RedisAddr + " as 127.0.0.1, AUTH and PING answered",
		"ok      cluster        6 nodes, 16384 of 16384 slots covered",
		" -> 127.0.0.1:" + strconv.Itoa(first) + "\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("check's output lacks %q:\n%s", want, out)
		}
	}
	if n := strings.Count(out, "ok      cluster node"); n != 6 {
		t.Errorf("check printed %d cluster nodes, want 6:\n%s", n, out)
	}
	assertNoToken(t, plain, "check's output", out)

	a.Close()
	b.Close()
	if code, body := p.quit(); code != http.StatusOK {
		t.Fatalf("POST /quitquitquit: %d %q", code, body)
	}
	if code := p.wait(30 * time.Second); code != exitOK {
		t.Errorf("exit %d after draining both caches, want %d", code, exitOK)
	}
	if l := p.logLines("shut down cleanly"); len(l) != 1 {
		t.Errorf("no clean shutdown line")
	}
}
