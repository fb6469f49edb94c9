// Package metrics provides the proxy's Prometheus metrics: the collectors, the proxy.Observer
// that feeds them, the token source's hooks, and the /metrics handler.
//
// Every family is named entra_redis_proxy_*. Every label takes its values from a small fixed
// set; a value outside the set is counted as "other", so a caller's mistake cannot grow the
// number of series. The per-event methods run on the proxy's hot path: they look up a counter
// or histogram resolved ahead of time and never allocate.
package metrics

import (
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

const namespace = "entra_redis_proxy"

// other is the label value for anything outside a label's known set.
const other = "other"

// Label values for each labelled family; "other" is added to each.
var (
	rejectReasons  = []string{"max_connections", "shutting_down", "local_auth", "local_auth_closed", "no_token"}
	upstreamKinds  = []string{"dial", "tls", "auth", "closed", "token_expired", "stalled", "protocol"}
	refreshResults = []string{"ok", "unchanged", "error"}
	reauthResults  = []string{"ok", "error"}
	mechanisms     = []string{"handover", "handover_refused", "unblock_reissue", "unblock_retry", "unblock_missed", "lease_renewed", "tx_replay", "tx_abort", "idle_ping", "pool_reuse",
		"reconnect_restored", "reconnect_outstanding", "reconnect_unrestorable", "reconnect_failed",
		"maintenance_move", "maintenance_handover", "maintenance_unmoved"}
)

// Metrics holds the proxy's metric families. It implements proxy.Observer, and it is a
// prometheus.Collector of its own families (New registers it). Its methods are safe for
// concurrent use.
type Metrics struct {
	collectors []prometheus.Collector // own families, for Describe and Collect
	gatherer   prometheus.Gatherer    // what Handler serves

	clientsOpen     prometheus.Gauge
	clientsAccepted prometheus.Counter
	clientsRejected labelled
	upstreamOpen    prometheus.Gauge
	upstreamDial    prometheus.Observer
	upstreamErrors  labelled
	commands        *commandDurations
	bytesIn         prometheus.Counter
	bytesOut        prometheus.Counter
	tokenRefreshes  labelled
	tokenExpiry     prometheus.Gauge
	reauths         labelled
	mechanisms      labelled
	announcements   labelled
	maxConnections  prometheus.Gauge
	fdBudget        prometheus.Gauge
	pooled          atomic.Pointer[func() int] // what pooled_upstream_connections reads at a scrape
	listeners       listenerFamilies           // by cache and listener (listeners.go)
}

var _ proxy.Observer = (*Metrics)(nil)

// New creates the metrics and registers them with reg, together with the Go runtime and
// process collectors (an AlreadyRegisteredError for those two is ignored, so
// prometheus.DefaultRegisterer works too). A nil reg means a new private registry.
//
// Handler serves what reg gathers when reg is also a prometheus.Gatherer (a
// *prometheus.Registry is both, as is prometheus.DefaultRegisterer); otherwise it serves
// only this package's families. New panics if its own families are already registered.
func New(reg prometheus.Registerer) *Metrics {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &Metrics{}
	gauge := func(name, help string) prometheus.Gauge {
		g := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: namespace, Name: name, Help: help})
		m.collectors = append(m.collectors, g)
		return g
	}
	counter := func(name, help string) prometheus.Counter {
		c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help})
		m.collectors = append(m.collectors, c)
		return c
	}
	counterVec := func(name, help, label string, values []string) labelled {
		v := prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: namespace, Name: name, Help: help}, []string{label})
		m.collectors = append(m.collectors, v)
		return newLabelled(v, values)
	}

	m.clientsOpen = gauge("client_connections", "Client connections open now.")
	m.clientsAccepted = counter("client_connections_accepted_total", "Client connections accepted.")
	m.clientsRejected = counterVec("client_connections_rejected_total",
		"Client connections and commands refused, by reason: max_connections, shutting_down, no_token (no valid Entra token: answered without dialing), local_auth (a wrong LOCAL_PASSWORD), local_auth_closed (a connection closed after too many).", "reason", rejectReasons)
	m.upstreamOpen = gauge("upstream_connections", "Upstream connections open now.")
	dial := prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: namespace, Name: "upstream_dial_duration_seconds",
		Help:    "Time taken to open an upstream connection.",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
	})
	m.collectors = append(m.collectors, dial)
	m.upstreamDial = dial
	m.upstreamErrors = counterVec("upstream_errors_total",
		"Upstream connection failures, by kind: dial, tls, auth, closed, token_expired (closed by the cache after the Entra token expired), stalled, protocol.", "kind", upstreamKinds)

	m.commands = newCommandDurations(append([]string{other}, proxy.CommandNames...))
	m.collectors = append(m.collectors, m.commands)

	bytes := prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: namespace, Name: "bytes_total",
		Help: "Bytes read, by direction: in is read from clients, out is read from upstreams (it includes the replies to the proxy's own AUTH and handover commands, which clients do not see).",
	}, []string{"direction"})
	m.collectors = append(m.collectors, bytes)
	m.bytesIn, m.bytesOut = bytes.WithLabelValues("in"), bytes.WithLabelValues("out")

	m.tokenRefreshes = counterVec("token_refreshes_total",
		"Token fetches, by result: ok (a new token), unchanged (the credential returned the current token), error.",
		"result", refreshResults)
	m.tokenExpiry = gauge("token_expiry_timestamp_seconds", "When the current token expires, in unix seconds.")
	m.reauths = counterVec("reauths_total", "AUTHs sent on open upstream connections after a token rotation, by result.",
		"result", reauthResults)
	m.mechanisms = counterVec("mechanisms_total",
		"Times the proxy used a mechanism that keeps clients connected across token rotations, idle timeouts and "+
			"upstream closes: handover, handover_refused, unblock_reissue, unblock_retry, unblock_missed, lease_renewed, tx_replay, tx_abort, "+
			"idle_ping, pool_reuse, reconnect_restored, reconnect_outstanding (closed with a reply outstanding), "+
			"reconnect_unrestorable, reconnect_failed, maintenance_move, maintenance_handover, maintenance_unmoved.",
		"mechanism", mechanisms)
	m.announcements = counterVec("maintenance_announcements_total",
		"Maintenance announcements seen (AzureRedisEvents messages and Managed Redis notification pushes), by type.", "type", proxy.AnnouncementTypes)
	m.maxConnections = gauge("max_connections", "Most client connections allowed at once, on all listeners together; 0 means unlimited.")
	m.fdBudget = gauge("descriptor_budget", "Descriptors shared by client connections (two each: the client's and its upstream's) "+
		"and the warm pools' upstream connections (one each), from RLIMIT_NOFILE; 0 means none.")
	// Read at a scrape: pooled connections change at every connect, and counting them here would add to it.
	pooled := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Namespace: namespace, Name: "pooled_upstream_connections",
		Help: "Upstream connections the warm pools of all listeners (LISTEN's and every cluster node listener's) hold now, " +
			"idle or being dialled or checked; each takes one descriptor of descriptor_budget."},
		func() float64 {
			if f := m.pooled.Load(); f != nil {
				return float64((*f)())
			}
			return 0
		})
	m.collectors = append(m.collectors, pooled)
	m.listeners = newListenerFamilies(func(c prometheus.Collector) { m.collectors = append(m.collectors, c) })

	reg.MustRegister(m)
	for _, c := range []prometheus.Collector{
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		if err := reg.Register(c); err != nil {
			if _, dup := err.(prometheus.AlreadyRegisteredError); !dup {
				panic(err)
			}
		}
	}
	if g, ok := reg.(prometheus.Gatherer); ok {
		m.gatherer = g
	} else {
		own := prometheus.NewRegistry()
		own.MustRegister(m)
		m.gatherer = own
	}
	return m
}

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.collectors {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.collectors {
		c.Collect(ch)
	}
}

// Handler serves the metrics in the Prometheus exposition formats, for /metrics.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.gatherer, promhttp.HandlerOpts{
		// A failing collector should not hide all the others.
		ErrorHandling: promhttp.ContinueOnError,
		// Scrapers are few; this bounds the work a flood of requests can cause.
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	})
}

// ClientOpened implements proxy.Observer.
func (m *Metrics) ClientOpened() {
	m.clientsOpen.Inc()
	m.clientsAccepted.Inc()
}

// ClientClosed implements proxy.Observer.
func (m *Metrics) ClientClosed() { m.clientsOpen.Dec() }

// ClientRejected implements proxy.Observer.
func (m *Metrics) ClientRejected(reason string) { m.clientsRejected.get(reason).Inc() }

// UpstreamOpened implements proxy.Observer.
func (m *Metrics) UpstreamOpened(dial time.Duration) {
	m.upstreamOpen.Inc()
	m.upstreamDial.Observe(dial.Seconds())
}

// UpstreamClosed implements proxy.Observer.
func (m *Metrics) UpstreamClosed() { m.upstreamOpen.Dec() }

// UpstreamError implements proxy.Observer.
func (m *Metrics) UpstreamError(kind string) { m.upstreamErrors.get(kind).Inc() }

// CommandsDone implements proxy.Observer. A name outside proxy.CommandNames counts as "other".
func (m *Metrics) CommandsDone(name string, d time.Duration, n int) { m.commands.observe(name, d, n) }

// BytesIn implements proxy.Observer.
func (m *Metrics) BytesIn(n int) { m.bytesIn.Add(float64(n)) }

// BytesOut implements proxy.Observer.
func (m *Metrics) BytesOut(n int) { m.bytesOut.Add(float64(n)) }

// ReAuth implements proxy.Observer.
func (m *Metrics) ReAuth(result string) { m.reauths.get(result).Inc() }

// Mechanism implements proxy.Observer.
func (m *Metrics) Mechanism(name string) { m.mechanisms.get(name).Inc() }

// Announcement implements proxy.Observer.
func (m *Metrics) Announcement(kind string) { m.announcements.get(kind).Inc() }

// TokenRefresh records one token fetch by its result ("ok", "unchanged" or "error") and,
// when expires is not zero, sets the token expiry gauge to it.
func (m *Metrics) TokenRefresh(result string, expires time.Time) {
	m.tokenRefreshes.get(result).Inc()
	if !expires.IsZero() {
		m.tokenExpiry.Set(float64(expires.Unix()))
	}
}

// SetMaxConnections records the client connection limit (0 = unlimited).
func (m *Metrics) SetMaxConnections(n int) { m.maxConnections.Set(float64(n)) }

// SetDescriptorBudget records the descriptors shared by clients and pools, and what reads how many the pools
// hold (proxy.ConnLimit.Pooled).
func (m *Metrics) SetDescriptorBudget(n int, pooled func() int) {
	m.fdBudget.Set(float64(n))
	m.pooled.Store(&pooled)
}

// labelled is a counter family with one label whose series are all created up front, so
// that they read 0 before the first event and so that counting is one map lookup.
type labelled map[string]prometheus.Counter

func newLabelled(v *prometheus.CounterVec, values []string) labelled {
	l := make(labelled, len(values)+1)
	for _, val := range append([]string{other}, values...) {
		l[val] = v.WithLabelValues(val)
	}
	return l
}

// get returns the counter of value, or of "other" for a value outside the set.
func (l labelled) get(value string) prometheus.Counter {
	if c, ok := l[value]; ok {
		return c
	}
	return l[other]
}
