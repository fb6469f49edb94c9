package main

import (
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/topology"
)

// clusterRetry is the wait between two failed cluster detections.
const clusterRetry = 10 * time.Second

// newCluster returns the Cluster of CLUSTER=auto|on, nil for off or a unix socket LISTEN (node
// listeners need a host; validate refuses on with one). opts are the main Server's.
func newCluster(cfg *Config, tc *tls.Config, opts proxy.Options) *proxy.Cluster {
	if cfg.Cluster == "off" || strings.HasPrefix(cfg.Listen, "unix:") {
		return nil
	}
	first, last, _ := topology.ParsePortRange(cfg.ClusterPorts) // validated
	listenHost, _, _ := net.SplitHostPort(cfg.Listen)
	seedHost, _, _ := net.SplitHostPort(cfg.Upstream)
	return proxy.NewCluster(proxy.ClusterConfig{
		Seed: opts.Dialer, SeedHost: seedHost, TLS: tc, ListenHost: listenHost,
		FirstPort: first, LastPort: last, Server: opts,
	})
}

// detectCluster asks the cache, once the first token is there, whether it is a cluster; a cluster
// gets its node listeners. A failure is retried every clusterRetry; "not a cluster" ends it under
// auto, and is an error that is retried under on. It returns when ctx ends.
func detectCluster(ctx context.Context, mode string, c *proxy.Cluster, ready <-chan struct{}, log *slog.Logger) {
	select {
	case <-ready:
	case <-ctx.Done():
		return
	}
	for {
		t, err := c.Detect(ctx)
		switch {
		case err == nil:
			log.Info("cluster mode: one local listener per node; point a cluster-aware client at LISTEN", "topology", t.String())
			return
		case errors.Is(err, proxy.ErrNotCluster) && mode == "auto":
			log.Info("the cache is not a cluster: serving it as one endpoint")
			return
		case errors.Is(err, proxy.ErrNotCluster):
			log.Error("ENTRA_REDIS_PROXY_CLUSTER=on, but the cache is not a Redis Cluster: set it to auto or off, or check ENTRA_REDIS_PROXY_UPSTREAM")
		default:
			log.Warn("cluster detection failed; retrying", "err", err, "retry_in", clusterRetry.String(), "remedy", proxy.Remedy(err))
		}
		t0 := time.NewTimer(clusterRetry)
		select {
		case <-t0.C:
		case <-ctx.Done():
			t0.Stop()
			return
		}
	}
}
