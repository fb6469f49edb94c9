package metrics

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

func TestLint(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := New(reg)
	// Create the lazily made series too, so that every family has samples to lint.
	m.CommandsDone("get", time.Millisecond, 1)
	problems, err := testutil.CollectAndLint(m)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	if n := testutil.CollectAndCount(m); n < 15 {
		t.Errorf("linted %d series, want every family (at least 15)", n)
	}
}

func TestMethods(t *testing.T) {
	tcs := []struct {
		desc string
		do   func(m *Metrics)
		want map[string]map[string]float64 // family -> label set -> value, for the families that must change
	}{
		{
			desc: "client opened and closed",
			do:   func(m *Metrics) { m.ClientOpened(); m.ClientOpened(); m.ClientClosed() },
			want: fams{
				"entra_redis_proxy_client_connections":                {"": 1},
				"entra_redis_proxy_client_connections_accepted_total": {"": 2},
			},
		},
		{
			desc: "client rejected, unknown reason is other",
			do:   func(m *Metrics) { m.ClientRejected("max_connections"); m.ClientRejected("nonsense") },
			want: fams{"entra_redis_proxy_client_connections_rejected_total": {`reason="local_auth"`: 0, `reason="max_connections"`: 1,
				`reason="other"`: 1, `reason="shutting_down"`: 0}},
		},
		{
			desc: "upstream opened and closed",
			do: func(m *Metrics) {
				m.UpstreamOpened(30 * time.Millisecond)
				m.UpstreamOpened(2 * time.Second)
				m.UpstreamClosed()
			},
			want: fams{
				"entra_redis_proxy_upstream_connections": {"": 1},
				"entra_redis_proxy_upstream_dial_duration_seconds": {"_count": 2, "_sum": 2.03,
					`le="0.001"`: 0, `le="0.0025"`: 0, `le="0.005"`: 0, `le="0.01"`: 0, `le="0.025"`: 0,
					`le="0.05"`: 1, `le="0.1"`: 1, `le="0.25"`: 1, `le="0.5"`: 1, `le="1"`: 1,
					`le="2.5"`: 2, `le="5"`: 2, `le="10"`: 2},
			},
		},
		{
			desc: "upstream error",
			do:   func(m *Metrics) { m.UpstreamError("tls"); m.UpstreamError("tls"); m.UpstreamError("auth") },
			want: fams{"entra_redis_proxy_upstream_errors_total": {`kind="auth"`: 1, `kind="closed"`: 0, `kind="dial"`: 0, `kind="other"`: 0,
				`kind="protocol"`: 0, `kind="tls"`: 2}},
		},
		{
			desc: "bytes",
			do:   func(m *Metrics) { m.BytesIn(10); m.BytesIn(5); m.BytesOut(7) },
			want: fams{"entra_redis_proxy_bytes_total": {`direction="in"`: 15, `direction="out"`: 7}},
		},
		{
			desc: "token refresh; a failed one keeps the expiry",
			do: func(m *Metrics) {
				m.TokenRefresh("ok", time.Unix(1700000000, 0))
				m.TokenRefresh("unchanged", time.Unix(1700000000, 0))
				m.TokenRefresh("error", time.Time{})
			},
			want: fams{
				"entra_redis_proxy_token_refreshes_total": {`result="error"`: 1, `result="ok"`: 1,
					`result="other"`: 0, `result="unchanged"`: 1},
				"entra_redis_proxy_token_expiry_timestamp_seconds": {"": 1700000000},
			},
		},
		{
			desc: "reauth",
			do:   func(m *Metrics) { m.ReAuth("ok"); m.ReAuth("error"); m.ReAuth("ok") },
			want: fams{"entra_redis_proxy_reauths_total": {`result="error"`: 1, `result="ok"`: 2, `result="other"`: 0}},
		},
		{
			desc: "mechanisms",
			do: func(m *Metrics) {
				for _, name := range []string{"handover", "unblock_reissue", "unblock_retry", "unblock_retry", "unblock_missed",
					"tx_replay", "tx_abort", "idle_ping", "pool_reuse", "pool_reuse", "bogus"} {
					m.Mechanism(name)
				}
			},
			want: fams{"entra_redis_proxy_mechanisms_total": {`mechanism="handover"`: 1, `mechanism="idle_ping"`: 1, `mechanism="other"`: 1,
				`mechanism="pool_reuse"`: 2, `mechanism="tx_abort"`: 1, `mechanism="tx_replay"`: 1, `mechanism="unblock_reissue"`: 1,
				`mechanism="unblock_retry"`: 2, `mechanism="unblock_missed"`: 1}},
		},
		{
			desc: "max connections",
			do:   func(m *Metrics) { m.SetMaxConnections(128) },
			want: fams{"entra_redis_proxy_max_connections": {"": 128}},
		},
		{
			desc: "descriptor budget",
			do:   func(m *Metrics) { m.SetDescriptorBudget(174, func() int { return 7 }) },
			want: fams{"entra_redis_proxy_descriptor_budget": {"": 174}, "entra_redis_proxy_pooled_upstream_connections": {"": 7}},
		},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			m := New(prometheus.NewRegistry())
			before := samples(t, m)
			tc.do(m)
			after := samples(t, m)
			for family, want := range tc.want {
				for k, v := range want {
					if g, ok := after[family][k]; !ok || math.Abs(g-v) > 1e-9 {
						t.Errorf("%s{%s} = %v (present %v), want %v", family, k, g, ok, v)
					}
				}
			}
			// Nothing else changed.
			for family, s := range after {
				for k, v := range s {
					if _, listed := tc.want[family][k]; !listed && before[family][k] != v {
						t.Errorf("%s{%s} changed from %v to %v", family, k, before[family][k], v)
					}
				}
			}
		})
	}
}

type fams = map[string]map[string]float64

// samples returns m's samples by family and label set (`a="x",b="y"`, "" for none);
// a histogram gives its _count, its _sum and its buckets (`le="0.5"`, cumulative).
func samples(t *testing.T, m *Metrics) map[string]map[string]float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]map[string]float64{}
	for _, mf := range mfs {
		s := map[string]float64{}
		for _, metric := range mf.GetMetric() {
			var labels []string
			for _, l := range metric.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			key := strings.Join(labels, ",")
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				s[key] = metric.GetCounter().GetValue()
			case dto.MetricType_GAUGE:
				s[key] = metric.GetGauge().GetValue()
			case dto.MetricType_HISTOGRAM:
				h := metric.GetHistogram()
				s[key+"_count"] = float64(h.GetSampleCount())
				s[key+"_sum"] = h.GetSampleSum()
				for _, b := range h.GetBucket() {
					s[strings.Join(append(labels, fmt.Sprintf("le=%q", strconv.FormatFloat(b.GetUpperBound(), 'g', -1, 64))), ",")] = float64(b.GetCumulativeCount())
				}
			default:
				t.Fatalf("%s: unexpected type %v", mf.GetName(), mf.GetType())
			}
		}
		out[mf.GetName()] = s
	}
	return out
}

func TestCommandsDone(t *testing.T) {
	m := New(prometheus.NewRegistry())
	const family = "entra_redis_proxy_command_duration_seconds"
	if n := testutil.CollectAndCount(m, family); n != 0 {
		t.Errorf("%d command series before any command, want 0 (series are made on first use)", n)
	}
	m.CommandsDone("get", time.Millisecond, 1)
	m.CommandsDone("get", 2*time.Millisecond, 1)
	m.CommandsDone("set", time.Millisecond, 1)
	m.CommandsDone("GET", time.Millisecond, 1)        // not lower case: not in the list
	m.CommandsDone("frobnicate", time.Millisecond, 1) // unknown
	m.CommandsDone("", time.Millisecond, 1)

	got := samples(t, m)[family]
	want := map[string]float64{"get": 2, "set": 1, "other": 3}
	for name, n := range want {
		if c := got[fmt.Sprintf("command=%q_count", name)]; c != n {
			t.Errorf("command=%q count %v, want %v", name, c, n)
		}
	}
	if n := testutil.CollectAndCount(m, family); n != len(want) {
		t.Errorf("%d command series, want %d", n, len(want))
	}
	// Every listed name has its own series.
	for _, name := range proxy.CommandNames {
		m.CommandsDone(name, time.Millisecond, 1)
	}
	if n, want := testutil.CollectAndCount(m, family), len(proxy.CommandNames)+1; n != want {
		t.Errorf("%d command series after every listed name, want %d", n, want)
	}
}

func TestRegister(t *testing.T) {
	t.Run("registry serves own, Go and process families", func(t *testing.T) {
		m := New(prometheus.NewRegistry())
		body := scrape(t, m.Handler())
		for _, want := range []string{"entra_redis_proxy_client_connections ", "go_goroutines ", "process_"} {
			if !strings.Contains(body, want) {
				t.Errorf("/metrics lacks %q", want)
			}
		}
	})
	t.Run("nil registerer", func(t *testing.T) {
		m := New(nil)
		if body := scrape(t, m.Handler()); !strings.Contains(body, "entra_redis_proxy_max_connections 0") {
			t.Errorf("/metrics lacks entra_redis_proxy_max_connections:\n%s", body)
		}
	})
	t.Run("Go and process collectors already registered", func(t *testing.T) {
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		New(reg) // must not panic
	})
	t.Run("registerer that is not a gatherer", func(t *testing.T) {
		reg := prometheus.NewRegistry()
		m := New(prometheus.WrapRegistererWith(prometheus.Labels{"pod": "x"}, reg))
		body := scrape(t, m.Handler())
		if !strings.Contains(body, "entra_redis_proxy_bytes_total") {
			t.Errorf("/metrics lacks the package's families:\n%s", body)
		}
	})
}

func scrape(t *testing.T, h http.Handler) string {
	t.Helper()
	srv := httptest.NewServer(h)
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d: %s", resp.StatusCode, b)
	}
	return string(b)
}

func TestHotPathAllocs(t *testing.T) {
	m := New(prometheus.NewRegistry())
	m.CommandsDone("get", time.Millisecond, 1) // first use creates the series
	for _, tc := range []struct {
		desc string
		f    func()
	}{
		{"CommandsDone known", func() { m.CommandsDone("get", time.Millisecond, 1) }},
		{"CommandsDone other", func() { m.CommandsDone("frobnicate", time.Millisecond, 1) }},
		{"BytesIn", func() { m.BytesIn(512) }},
		{"BytesOut", func() { m.BytesOut(512) }},
	} {
		t.Run(tc.desc, func(t *testing.T) {
			tc.f()
			if n := testing.AllocsPerRun(100, tc.f); n != 0 {
				t.Errorf("%v allocs per call, want 0", n)
			}
		})
	}
}

func BenchmarkCommandsDone(b *testing.B) {
	m := New(prometheus.NewRegistry())
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			m.CommandsDone("get", 250*time.Microsecond, 1)
		}
	})
}

// A batch of n equal observations counts as n in the count, the sum and its bucket; bounds are inclusive,
// as in client_golang's histograms.
func TestCommandsDoneBatch(t *testing.T) {
	m := New(prometheus.NewRegistry())
	m.CommandsDone("get", 500*time.Microsecond, 16) // on the first bound
	m.CommandsDone("get", 3*time.Millisecond, 4)
	m.CommandsDone("get", time.Minute, 1) // above every bound
	got := samples(t, m)["entra_redis_proxy_command_duration_seconds"]
	for key, want := range map[string]float64{
		`command="get"_count`:       21,
		`command="get",le="0.0005"`: 16,
		`command="get",le="0.0025"`: 16,
		`command="get",le="0.005"`:  20,
		`command="get",le="10"`:     20,
	} {
		if got[key] != want {
			t.Errorf("%s = %v, want %v", key, got[key], want)
		}
	}
	if sum, want := got[`command="get"_sum`], 16*0.0005+4*0.003+60; math.Abs(sum-want) > 1e-9 {
		t.Errorf("sum %v, want %v", sum, want)
	}
}

func BenchmarkBytesIn(b *testing.B) {
	m := New(prometheus.NewRegistry())
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			m.BytesIn(512)
		}
	})
}
