package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"strings"

	"github.com/entra-redis-proxy/entra-redis-proxy/metrics"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// served is one cache the proxy serves: its listener, its Server and, for a clustered cache, its
// Cluster of node listeners.
type served struct {
	cache
	log     *slog.Logger // with the upstream attribute
	srv     *proxy.Server
	cluster *proxy.Cluster // nil with CLUSTER=off or a unix socket listener
	ln      net.Listener
	cleanup func() // removes a unix socket
}

// startCache opens k's listener and builds its Server (and Cluster) from base, the options every
// cache shares; Serve is left to the caller.
func startCache(cfg *Config, k cache, base proxy.Options, m *metrics.Metrics, ports *proxy.NodePorts, log *slog.Logger) (*served, error) {
	tc, err := tlsConfig(cfg, k.Upstream)
	if err != nil {
		return nil, err
	}
	sv := &served{cache: k, log: log.With("upstream", k.Upstream)}
	opts := base
	opts.Dialer = &proxy.TLSDialer{Addr: k.Upstream, Config: tc}
	opts.Logger = sv.log
	opts.Observer = m.Listener(k.Upstream, metrics.ListenLabel)
	if cfg.Cluster != "off" && !strings.HasPrefix(k.Listen, "unix:") {
		listenHost, _, _ := net.SplitHostPort(k.Listen)
		seedHost, _, _ := net.SplitHostPort(k.Upstream)
		sv.cluster = proxy.NewCluster(proxy.ClusterConfig{
			Seed: opts.Dialer, SeedHost: seedHost, TLS: tc, ListenHost: listenHost, Ports: ports, Name: k.Upstream,
			Observer: m.Cluster(k.Upstream), Server: opts,
			NodeObserver: func(port int) proxy.Observer { return m.Listener(k.Upstream, strconv.Itoa(port)) },
		})
		opts.Cluster = sv.cluster
	}
	if sv.srv, err = proxy.New(opts); err != nil {
		return nil, err
	}
	if sv.ln, sv.cleanup, err = listen("LISTEN", k.Listen); err != nil {
		sv.srv.Close()
		return nil, err
	}
	return sv, nil
}

// unreachable returns why the cache, or one of its cluster nodes, cannot be reached now (readiness).
func (sv *served) unreachable() error {
	if err := sv.srv.Unreachable(); err != nil {
		return fmt.Errorf("%s: %w", sv.Upstream, err)
	}
	if sv.cluster != nil {
		if err := sv.cluster.Unreachable(); err != nil {
			return fmt.Errorf("%s: %w", sv.Upstream, err)
		}
	}
	return nil
}

// shutdown drains the cache's listener and node listeners and returns how many connections were cut.
func (sv *served) shutdown(ctx context.Context) int {
	cut := sv.srv.Shutdown(ctx) // closes the listener: Serve returns
	if sv.cluster != nil {
		cut += sv.cluster.Shutdown(ctx)
	}
	return cut
}

// close stops the cache at once (a failed start).
func (sv *served) close() {
	sv.ln.Close()
	sv.srv.Close()
	if sv.cluster != nil {
		sv.cluster.Shutdown(context.Background())
	}
}
