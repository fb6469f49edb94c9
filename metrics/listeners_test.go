package metrics

import (
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// A listener's Observer counts in the process-wide families and in its own series; a cluster's
// Observer counts refreshes by reason and result and sets the listener gauge.
func TestListenerAndCluster(t *testing.T) {
	m := New(prometheus.NewRegistry())
	main, node := m.Listener("a:6380", ListenLabel), m.Listener("a:6380", "7001")
	other := m.Listener("b:10000", ListenLabel)
	main.ClientOpened()
	node.ClientOpened()
	node.ClientOpened()
	node.ClientClosed()
	other.ClientRejected("max_connections")
	node.UpstreamOpened(time.Millisecond)
	node.UpstreamError("dial")
	main.BytesIn(10)
	node.BytesOut(7)
	c := m.Cluster("a:6380")
	c.TopologyRefresh(proxy.RefreshDetect, nil)
	c.TopologyRefresh(proxy.RefreshPeriodic, nil)
	c.TopologyRefresh(proxy.RefreshPeriodic, errors.New("dial"))
	c.TopologyRefresh("nonsense", nil)
	c.NodeListeners(5, 1)

	got := samples(t, m)
	want := fams{
		"entra_redis_proxy_client_connections":                         {"": 2},
		"entra_redis_proxy_client_connections_accepted_total":          {"": 3},
		"entra_redis_proxy_listener_client_connections":                {`listener="listen",upstream="a:6380"`: 1, `listener="7001",upstream="a:6380"`: 1, `listener="listen",upstream="b:10000"`: 0},
		"entra_redis_proxy_listener_client_connections_accepted_total": {`listener="listen",upstream="a:6380"`: 1, `listener="7001",upstream="a:6380"`: 2},
		"entra_redis_proxy_listener_client_connections_rejected_total": {`listener="listen",upstream="b:10000"`: 1, `listener="7001",upstream="a:6380"`: 0},
		"entra_redis_proxy_client_connections_rejected_total":          {`reason="max_connections"`: 1},
		"entra_redis_proxy_listener_upstream_connections":              {`listener="7001",upstream="a:6380"`: 1},
		"entra_redis_proxy_listener_upstream_errors_total":             {`listener="7001",upstream="a:6380"`: 1},
		"entra_redis_proxy_upstream_errors_total":                      {`kind="dial"`: 1},
		"entra_redis_proxy_bytes_total":                                {`direction="in"`: 10, `direction="out"`: 7},
		"entra_redis_proxy_cluster_node_listeners":                     {`state="open",upstream="a:6380"`: 5, `state="departed",upstream="a:6380"`: 1},
		"entra_redis_proxy_cluster_topology_refreshes_total": {`reason="detect",result="ok",upstream="a:6380"`: 1,
			`reason="periodic",result="ok",upstream="a:6380"`: 1, `reason="periodic",result="error",upstream="a:6380"`: 1,
			`reason="unknown_node",result="ok",upstream="a:6380"`: 0, `reason="other",result="ok",upstream="a:6380"`: 1},
	}
	for fam, want := range want {
		for labels, v := range want {
			if g, ok := got[fam][labels]; !ok || g != v {
				t.Errorf("%s{%s} = %v (present %v), want %v", fam, labels, g, ok, v)
			}
		}
	}
}

// A listener's hot-path events allocate nothing, as the process-wide ones.
func TestListenerHotPathAllocs(t *testing.T) {
	o := New(prometheus.NewRegistry()).Listener("a:6380", "7001")
	for _, f := range []func(){func() { o.BytesIn(512) }, func() { o.BytesOut(512) }, func() { o.CommandsDone("get", time.Millisecond, 1) }} {
		f()
		if n := testing.AllocsPerRun(100, f); n != 0 {
			t.Errorf("%v allocs per call, want 0", n)
		}
	}
}

// BenchmarkListenerBytesIn is BenchmarkBytesIn through a listener's Observer: compare the two side by side.
func BenchmarkListenerBytesIn(b *testing.B) {
	o := New(prometheus.NewRegistry()).Listener("a:6380", "7001")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			o.BytesIn(512)
		}
	})
}

// BenchmarkListenerCommandsDone is BenchmarkCommandsDone through a listener's Observer (no listener
// series: command latency stays process-wide).
func BenchmarkListenerCommandsDone(b *testing.B) {
	o := New(prometheus.NewRegistry()).Listener("a:6380", "7001")
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			o.CommandsDone("get", 250*time.Microsecond, 1)
		}
	})
}
