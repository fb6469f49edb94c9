package metrics

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// ListenLabel is the listener label of a cache's LISTEN; a cluster node listener's is its local port.
const ListenLabel = "listen"

// Label values of the cluster families; "other" is added to each.
var (
	refreshReasons = []string{proxy.RefreshDetect, proxy.RefreshUnknown, proxy.RefreshPeriodic}
	refreshOutcome = []string{"ok", "error"}
)

// listenerFamilies are the families labelled by cache (upstream) and listener. Their cardinality is
// bounded by the configuration: the configured caches times (1 + the ports of CLUSTER_PORTS), since a
// node's listener is named by its local port, not by its node id (node ids are new with every replaced
// node; ports are reused).
type listenerFamilies struct {
	clients   *prometheus.GaugeVec
	accepted  *prometheus.CounterVec
	rejected  *prometheus.CounterVec
	upstreams *prometheus.GaugeVec
	errors    *prometheus.CounterVec
	nodes     *prometheus.GaugeVec   // cluster_node_listeners{upstream,state}
	refreshes *prometheus.CounterVec // cluster_topology_refreshes_total{upstream,reason,result}
}

func newListenerFamilies(add func(prometheus.Collector)) listenerFamilies {
	ul := []string{"upstream", "listener"}
	gauge := func(name, help string, labels []string) *prometheus.GaugeVec {
		v := prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help}, labels)
		add(v)
		return v
	}
	counter := func(name, help string, labels []string) *prometheus.CounterVec {
		v := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help}, labels)
		add(v)
		return v
	}
	return listenerFamilies{
		clients:   gauge("listener_client_connections", "Client connections open now, by cache (upstream) and listener (listen, or a cluster node listener's local port).", ul),
		accepted:  counter("listener_client_connections_accepted_total", "Client connections accepted, by cache and listener.", ul),
		rejected:  counter("listener_client_connections_rejected_total", "Client connections and commands refused, by cache and listener (reasons: client_connections_rejected_total).", ul),
		upstreams: gauge("listener_upstream_connections", "Upstream connections open now, by cache and listener.", ul),
		errors:    counter("listener_upstream_errors_total", "Upstream connection failures, by cache and listener (kinds: upstream_errors_total).", ul),
		nodes: gauge("cluster_node_listeners", "Cluster node listeners by cache and state: open (accepting), departed "+
			"(the node left the topology: closed to new clients, serving the connections opened before).", []string{"upstream", "state"}),
		refreshes: counter("cluster_topology_refreshes_total", "Cluster topology reads by cache, reason (detect, "+
			"unknown_node: a reply named a node without a listener, periodic) and result (ok, error).", []string{"upstream", "reason", "result"}),
	}
}

// Listener returns the Observer of one listener of cache upstream: the process-wide families plus the
// listener's own series of connection events, resolved here once so that such an event costs one more
// atomic add. The per-batch events (bytes, command latency) count in the process-wide families only:
// the hot path costs what it did (a listener's bytes counter took BytesIn from 14-15 to 58-68 ns in a benchmark).
func (m *Metrics) Listener(upstream, listener string) proxy.Observer {
	f := m.listeners
	l := prometheus.Labels{"upstream": upstream, "listener": listener}
	return &listenerObserver{Metrics: m, clients: f.clients.With(l), accepted: f.accepted.With(l),
		rejected: f.rejected.With(l), upstreams: f.upstreams.With(l), errors: f.errors.With(l)}
}

// listenerObserver is a listener's proxy.Observer.
type listenerObserver struct {
	*Metrics
	clients, upstreams         prometheus.Gauge
	accepted, rejected, errors prometheus.Counter
}

func (o *listenerObserver) ClientOpened() {
	o.Metrics.ClientOpened()
	o.clients.Inc()
	o.accepted.Inc()
}

func (o *listenerObserver) ClientClosed() {
	o.Metrics.ClientClosed()
	o.clients.Dec()
}

func (o *listenerObserver) ClientRejected(reason string) {
	o.Metrics.ClientRejected(reason)
	o.rejected.Inc()
}

func (o *listenerObserver) UpstreamOpened(dial time.Duration) {
	o.Metrics.UpstreamOpened(dial)
	o.upstreams.Inc()
}

func (o *listenerObserver) UpstreamClosed() {
	o.Metrics.UpstreamClosed()
	o.upstreams.Dec()
}

func (o *listenerObserver) UpstreamError(kind string) {
	o.Metrics.UpstreamError(kind)
	o.errors.Inc()
}

// Cluster returns the proxy.ClusterObserver of cache upstream.
func (m *Metrics) Cluster(upstream string) proxy.ClusterObserver {
	f := m.listeners
	c := &clusterObserver{open: f.nodes.WithLabelValues(upstream, "open"), departed: f.nodes.WithLabelValues(upstream, "departed"),
		refreshes: map[[2]string]prometheus.Counter{}}
	for _, reason := range append([]string{other}, refreshReasons...) {
		for _, result := range refreshOutcome {
			c.refreshes[[2]string{reason, result}] = f.refreshes.WithLabelValues(upstream, reason, result)
		}
	}
	return c
}

// clusterObserver is one cache's proxy.ClusterObserver; its series exist from the start (0).
type clusterObserver struct {
	open, departed prometheus.Gauge
	refreshes      map[[2]string]prometheus.Counter // [reason, result]
}

func (c *clusterObserver) TopologyRefresh(reason string, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	r, ok := c.refreshes[[2]string{reason, result}]
	if !ok {
		r = c.refreshes[[2]string{other, result}]
	}
	r.Inc()
}

func (c *clusterObserver) NodeListeners(open, departed int) {
	c.open.Set(float64(open))
	c.departed.Set(float64(departed))
}
