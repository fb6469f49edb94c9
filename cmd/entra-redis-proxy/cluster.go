package main

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// clusterRetry is the wait between two failed cluster detections.
const clusterRetry = 10 * time.Second

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
