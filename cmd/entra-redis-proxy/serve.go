package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/health"
	"github.com/entra-redis-proxy/entra-redis-proxy/metrics"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/tokensource"
	"github.com/entra-redis-proxy/entra-redis-proxy/topology"
)

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("%q is not debug, info, warn or error", s)
	}
	return l, nil
}

func newLogger(cfg *Config, w io.Writer) (*slog.Logger, error) {
	level, err := parseLevel(cfg.LogLevel)
	if err != nil {
		return nil, err
	}
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return slog.New(slog.NewTextHandler(w, opts)), nil
}

// tlsConfig returns the TLS settings of the cache at upstream: system roots plus TLS_CA_FILE, the verified
// name and SNI (TLS_SERVER_NAME, or the cache's host).
func tlsConfig(cfg *Config, upstream string) (*tls.Config, error) {
	host, _, _ := net.SplitHostPort(upstream)
	name := cfg.TLSServerName
	if name == "" {
		name = host
	}
	c := &tls.Config{ServerName: name, MinVersion: tls.VersionTLS12}
	if cfg.TLSCAFile != "" {
		pem, err := os.ReadFile(cfg.TLSCAFile)
		if err != nil {
			return nil, fmt.Errorf("%s_TLS_CA_FILE: %w", envPrefix, err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s_TLS_CA_FILE: %s holds no PEM certificate", envPrefix, cfg.TLSCAFile)
		}
		c.RootCAs = pool
	}
	return c, nil
}

func newTokenSource(cfg *Config, log *slog.Logger, onRefresh func(string, time.Time)) (*tokensource.Source, error) {
	newCred := func() (azcore.TokenCredential, error) {
		return tokensource.NewCredential(cfg.Credential, cfg.MIClientID, cfg.MIResourceID)
	}
	if _, err := newCred(); err != nil {
		return nil, fmt.Errorf("%s_CREDENTIAL=%s: %w", envPrefix, cfg.Credential, err)
	}
	return tokensource.New(newCred, tokensource.Options{
		Scope: cfg.Scope, Username: cfg.Username, Logger: log.With("component", "tokensource"), OnRefresh: onRefresh,
	})
}

// newHTTPServer returns the server of an HTTP listener. net/http's own errors (an accept failure at the
// open-file limit, a handler's panic) go through slog as warnings, so JSON logs stay JSON.
func newHTTPServer(log *slog.Logger, h http.Handler) *http.Server {
	return &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second,
		ErrorLog: slog.NewLogLogger(log.With("component", "http").Handler(), slog.LevelWarn)}
}

// listen opens the listener of setting (LISTEN, ADMIN_LISTEN): TCP, or a unix socket that only this user may use.
func listen(setting, addr string) (net.Listener, func(), error) {
	path, ok := strings.CutPrefix(addr, "unix:")
	if !ok {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, nil, fmt.Errorf("%s_%s: %w", envPrefix, setting, err)
		}
		return ln, func() {}, nil
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode()&os.ModeSocket != 0 {
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, nil, fmt.Errorf("%s_%s: %s is in use by another process", envPrefix, setting, path)
		}
		os.Remove(path) // a stale socket of an earlier run
	}
	// The socket is created with mode 0600 (umask 0177), so no other user can connect even for an instant.
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, nil, fmt.Errorf("%s_%s: %w", envPrefix, setting, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(true)
	return ln, func() { os.Remove(path) }, nil
}

// serve runs the proxy until a signal, /quitquitquit or a listener failure, then shuts down: readiness turns
// 503 at once, the listener stays open for MIN_SIGTERM_DELAY, then every client connection is closed at its
// next safe point, with every reply it asked for delivered (proxy.Server.Shutdown); the ones still open after
// MAX_SIGTERM_DELAY are cut. A signal during the shutdown forces it: the open connections are cut at once.
func serve(signals <-chan os.Signal, cfg *Config, log *slog.Logger) int {
	nofile, err := getNofile()
	if err != nil {
		log.Error("cannot read the open-file limit", "err", fmt.Errorf("getrlimit RLIMIT_NOFILE: %w", err))
		return exitConfig
	}
	// Each cache's LISTEN has its own pool; node listeners' pools draw on the same budget (their number is
	// not known yet).
	limit, err := deriveConnLimit(nofile, cfg.poolCeiling()*len(cfg.caches), cfg.MaxConnections)
	if err != nil {
		log.Error("cannot start", "err", err)
		return exitConfig
	}
	limit.log(log)

	reg := prometheus.NewRegistry()
	m := metrics.New(reg)
	m.SetMaxConnections(limit.limit)
	budget := proxy.NewDescriptorBudget(limit.limit, limit.budget)
	m.SetDescriptorBudget(limit.budget, budget.Pooled)

	src, err := newTokenSource(cfg, log, m.TokenRefresh)
	if err != nil {
		log.Error("cannot get Entra tokens", "err", err)
		return exitConfig
	}
	connLevel := slog.LevelInfo
	if !cfg.LogConnections {
		connLevel = slog.LevelDebug
	}
	// Shared by every cache: one identity and token, one budget of clients and pooled connections (the
	// process's descriptors), one range of node listener ports.
	base := proxy.Options{
		Tokens: src, Limit: budget, DialTimeout: cfg.DialTimeout,
		IdlePing: cfg.IdlePing, MaxBulk: int64(cfg.MaxBulkBytes), LocalPassword: cfg.LocalPassword,
		PoolSize: cfg.PoolSize, PoolMax: cfg.poolCeiling(), ReconnectTimeout: reconnectTimeout(cfg.ReconnectTimeout),
		MaintenanceEvents: cfg.MaintenanceEvents, MaintNotifications: cfg.MaintenanceEvents, ConnLogLevel: connLevel,
	}
	first, last, _ := topology.ParsePortRange(cfg.ClusterPorts) // validated
	ports := proxy.NewNodePorts(first, last, 0)
	var caches []*served
	closeAll := func() {
		for _, sv := range caches {
			sv.close()
		}
	}
	for _, k := range cfg.caches {
		sv, err := startCache(cfg, k, base, m, ports, log)
		if err != nil {
			log.Error("cannot start", "upstream", k.Upstream, "err", err)
			closeAll()
			return exitConfig
		}
		caches = append(caches, sv)
		defer sv.cleanup()
	}

	check := health.New(src.Valid, base.Limit.AtLimit)
	check.SetUnreachable(func() error {
		for _, sv := range caches {
			if err := sv.unreachable(); err != nil {
				return err
			}
		}
		return nil
	})
	quit := make(chan struct{})
	var quitOnce sync.Once
	var wg sync.WaitGroup // every goroutine serve starts; each ends before serve returns
	defer wg.Wait()
	// startHTTP serves mux on hln until stopHTTP; failMsg is logged if Serve fails.
	var httpSrvs []*http.Server
	startHTTP := func(failMsg string, mux *http.ServeMux, hln net.Listener) {
		hs := newHTTPServer(log, mux)
		httpSrvs = append(httpSrvs, hs)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := hs.Serve(hln); !errors.Is(err, http.ErrServerClosed) {
				log.Error(failMsg, "err", err)
			}
		}()
	}
	stopHTTP := func() {
		for _, hs := range httpSrvs {
			shCtx, cancel := context.WithTimeout(context.Background(), time.Second)
			if hs.Shutdown(shCtx) != nil {
				hs.Close() // a profile or a slow scrape still running: cut it
			}
			cancel()
		}
	}
	defer stopHTTP() // on an early return; a second Shutdown returns at once
	fail := func(msg string, err error) int {
		log.Error(msg, "err", err)
		closeAll()
		return exitConfig
	}
	if cfg.HTTPListen != "" {
		mux := http.NewServeMux()
		check.Register(mux)
		mux.Handle("/metrics", m.Handler())
		hln, err := net.Listen("tcp", cfg.HTTPListen)
		if err != nil {
			return fail("cannot listen for HTTP", fmt.Errorf("%s_HTTP_LISTEN: %w", envPrefix, err))
		}
		startHTTP("HTTP listener failed: health probes and metrics are not served", mux, hln)
	}
	// The admin endpoints can stop or profile the proxy: they listen apart, on loopback or a unix socket only
	// (Config.validateAdminListen), and only when one of them is on.
	admin := "off"
	if cfg.QuitQuitQuit || cfg.Pprof {
		mux := http.NewServeMux()
		if cfg.QuitQuitQuit {
			health.RegisterQuit(mux, func() { quitOnce.Do(func() { close(quit) }) })
		}
		if cfg.Pprof {
			mux.HandleFunc("/debug/pprof/", pprof.Index)
			mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
			mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
			mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		}
		aln, acleanup, err := listen("ADMIN_LISTEN", cfg.AdminListen)
		if err != nil {
			return fail("cannot listen for the admin endpoints", err)
		}
		defer acleanup()
		startHTTP("admin listener failed: /quitquitquit and /debug/pprof are not served", mux, aln)
		admin = cfg.AdminListen
	}

	tsCtx, stopTokens := context.WithCancel(context.Background())
	defer stopTokens()
	serveDone := make(chan error, len(caches))
	for _, sv := range caches {
		if sv.cluster != nil {
			wg.Add(1)
			go func() { defer wg.Done(); detectCluster(tsCtx, cfg.Cluster, sv.cluster, src.Ready(), sv.log) }()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := sv.srv.Serve(sv.ln); !errors.Is(err, proxy.ErrServerClosed) {
				serveDone <- fmt.Errorf("listener %s of %s: %w", sv.Listen, sv.Upstream, err)
			}
		}()
		sv.log.Info("serving a cache", "listen", sv.Listen)
	}
	wg.Add(2)
	go func() { defer wg.Done(); src.Run(tsCtx) }()

	log.Info("entra-redis-proxy started", "version", version, "caches", len(caches),
		"credential", cfg.Credential, "http", cfg.HTTPListen, "admin", admin)
	go func() {
		defer wg.Done()
		select {
		case <-src.Ready():
			check.NotifyStarted()
			log.Info("ready: holding an Entra token")
		case <-tsCtx.Done():
		}
	}()

	var listenErr error // a listener failure: the exit code says so even if every connection drained
	select {
	case sig := <-signals:
		log.Info("shutdown signal received", "signal", sig.String())
	case <-quit:
		log.Info("shutdown requested on /quitquitquit")
	case listenErr = <-serveDone:
		log.Error("listener failed: shutting down", "err", listenErr)
	}
	check.NotifyStopping()

	// From here a signal forces the shutdown: the delay ends and the open connections are cut.
	forced, force := context.WithCancel(context.Background())
	defer force()
	wg.Add(1)
	go func() {
		defer wg.Done()
		select {
		case sig := <-signals:
			log.Warn("signal received during the shutdown: cutting open connections now", "signal", sig.String())
			force()
		case <-forced.Done():
		}
	}()
	if cfg.MinSigtermDelay > 0 && listenErr == nil {
		log.Info("still accepting connections during the minimum shutdown delay", "delay", cfg.MinSigtermDelay.String())
		t := time.NewTimer(cfg.MinSigtermDelay)
		select {
		case <-t.C:
		case <-forced.Done():
		case listenErr = <-serveDone:
			log.Error("listener failed", "err", listenErr)
		}
		t.Stop()
	}
	// The budget counts every listener's clients, cluster node listeners' included.
	log.Info("waiting for open connections to finish", "connections", budget.Clients(), "max_wait", cfg.MaxSigtermDelay.String())
	drainCtx, cancel := context.WithTimeout(forced, cfg.MaxSigtermDelay)
	var cut atomic.Int64
	var drains sync.WaitGroup // every cache drains at once, within the same MAX_SIGTERM_DELAY
	for _, sv := range caches {
		drains.Add(1)
		go func() { defer drains.Done(); cut.Add(int64(sv.shutdown(drainCtx))) }()
	}
	drains.Wait()
	cancel()
	force() // the drain is over: a later signal has nothing left to force
	stopTokens()
	stopHTTP()
	switch {
	case listenErr != nil:
		log.Error("shut down after the listener failed", "cut", cut.Load())
		return exitRuntime
	case cut.Load() > 0:
		log.Warn("shut down; open connections were cut", "cut", cut.Load())
		if !cfg.ExitZeroOnSigterm {
			return exitRuntime
		}
		return exitOK
	}
	log.Info("shut down cleanly")
	return exitOK
}

// reconnectTimeout maps RECONNECT_TIMEOUT to proxy.Options.ReconnectTimeout, where 0 is the default and a
// negative value turns reconnects off.
func reconnectTimeout(d time.Duration) time.Duration {
	if d == 0 {
		return -1
	}
	return d
}
