package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/topology"
)

// runCheck walks the path a client connection takes (token, dial, TLS, AUTH, PING) and reports each step
// with what to do when it fails. It exits 0 only when every step passed.
func runCheck(ctx context.Context, cfg *Config, w io.Writer) int {
	ok := func(step, detail string) { fmt.Fprintf(w, "ok      %-14s %s\n", step, detail) }
	fail := func(step string, err error, remedy string) int {
		fmt.Fprintf(w, "FAILED  %-14s %v\n", step, err)
		if remedy != "" {
			fmt.Fprintf(w, "        remedy: %s\n", remedy)
		}
		return exitCheck
	}
	upstreams := make([]string, len(cfg.caches))
	for i, k := range cfg.caches {
		upstreams[i] = k.Upstream
	}
	ok("configuration", fmt.Sprintf("upstream %s, credential %s", strings.Join(upstreams, ", "), cfg.Credential))

	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	src, err := newTokenSource(cfg, quiet, nil)
	if err != nil {
		return fail("token", err, "check the credential settings (see --help); managed identity works only inside Azure")
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.DialTimeout+30*time.Second)
	defer cancel()
	tok, err := src.Refresh(ctx)
	if err != nil {
		return fail("token", err, "managed identity works only inside Azure; locally use azure-cli (az login) or a service principal (client-secret)")
	}
	ok("token", fmt.Sprintf("username %s, expires %s (in %s)", tok.Username, tok.ExpiresOn.UTC().Format(time.RFC3339),
		time.Until(tok.ExpiresOn).Round(time.Second)))

	// One token for every cache; one port range for all their node listeners, handed out in this order.
	first, last, _ := topology.ParsePortRange(cfg.ClusterPorts)
	ports := proxy.NewNodePorts(first, last, 0)
	code := exitOK
	for _, k := range cfg.caches {
		if cfg.Upstreams != "" {
			ok("cache", fmt.Sprintf("%s -> %s", k.Listen, k.Upstream))
		}
		if c := checkCache(ctx, cfg, k, proxy.Token(tok), ports, ok, fail); c != exitOK {
			code = c
		}
	}
	return code
}

// checkCache checks one cache: TLS, AUTH and PING, then its cluster topology.
func checkCache(ctx context.Context, cfg *Config, k cache, tok proxy.Token, ports *proxy.NodePorts, ok func(string, string), fail func(string, error, string) int) int {
	tc, err := tlsConfig(cfg, k.Upstream)
	if err != nil {
		return fail("tls settings", err, "")
	}
	dctx, dcancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer dcancel()
	d := &proxy.TLSDialer{Addr: k.Upstream, Config: tc}
	id, err := proxy.Probe(dctx, d, tok)
	if err != nil {
		return fail(proxy.ProbeStep(err), err, proxy.Remedy(err))
	}
	ok("upstream", fmt.Sprintf("TLS to %s as %s, AUTH and PING answered (CLIENT ID %d)", k.Upstream, tc.ServerName, id))
	if cfg.Cluster == "off" {
		return exitOK
	}
	return checkCluster(dctx, cfg, k, d, tok, ports, ok, fail)
}

// checkCluster reports the cluster topology and the local port each node would get on a fresh
// start (the running proxy keeps a node's port while the node exists).
func checkCluster(ctx context.Context, cfg *Config, k cache, d proxy.Dialer, tok proxy.Token, ports *proxy.NodePorts, ok func(string, string), fail func(string, error, string) int) int {
	seedHost, _, _ := net.SplitHostPort(k.Upstream)
	t, err := proxy.ReadTopology(ctx, d, seedHost, tok)
	switch {
	case errors.Is(err, proxy.ErrNotCluster) && cfg.Cluster == "auto":
		ok("cluster", "not a cluster: served as one endpoint")
		return exitOK
	case err != nil:
		return fail("cluster", err, "ENTRA_REDIS_PROXY_CLUSTER=on needs a clustered cache (Managed Redis with the OSS cluster policy, clustered Premium); set auto or off")
	}
	ok("cluster", t.String())
	host := "127.0.0.1"
	if h, _, err := net.SplitHostPort(k.Listen); err == nil {
		host = h
	}
	for _, n := range t.Nodes {
		port, err := ports.Assign(k.Upstream, n.ID)
		if err != nil {
			return fail("cluster", err, "")
		}
		ok("cluster node", fmt.Sprintf("%s -> %s", n.Addr, net.JoinHostPort(host, strconv.Itoa(port))))
	}
	return exitOK
}
