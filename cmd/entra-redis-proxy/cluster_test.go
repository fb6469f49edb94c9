package main

import (
	"bytes"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
)

// TestClusterMode: against a clustered cache the proxy (CLUSTER=auto) opens a listener per node from
// CLUSTER_PORTS, a cluster client at LISTEN works through them, and check prints the topology.
func TestClusterMode(t *testing.T) {
	fake := azurefake.StartT(t, azurefake.Options{Cluster: true, TokenLifetime: tokenLifetime})
	first, err := azurefake.FreePortRange(6)
	if err != nil {
		t.Fatal(err)
	}
	ports := strconv.Itoa(first) + "-" + strconv.Itoa(first+5)
	p := startProxy(t, fake, map[string]string{"CLUSTER_PORTS": ports})
	p.awaitLog("cluster mode: one local listener per node", 30*time.Second)
	c := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{p.listen}, ReadTimeout: 10 * time.Second})
	t.Cleanup(func() { c.Close() })
	for i := range 50 {
		k := "k" + strconv.Itoa(i)
		if err := setGet(t.Context(), c, k, k); err != nil {
			t.Fatal(err)
		}
	}

	var stdout, stderr bytes.Buffer
	if code := run([]string{"check"}, &stdout, &stderr); code != exitOK {
		t.Fatalf("check: exit %d\n%s%s", code, stdout.String(), stderr.String())
	}
	out := stdout.String()
	if !strings.Contains(out, "ok      cluster        6 nodes, 16384 of 16384 slots covered") ||
		strings.Count(out, "ok      cluster node") != 6 || !strings.Contains(out, "-> 127.0.0.1:"+strconv.Itoa(first)+"\n") {
		t.Fatalf("check's output lacks the topology:\n%s", out)
	}
}
