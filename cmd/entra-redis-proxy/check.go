package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
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
	ok("configuration", fmt.Sprintf("upstream %s, credential %s", cfg.Upstream, cfg.Credential))

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

	tc, err := tlsConfig(cfg)
	if err != nil {
		return fail("tls settings", err, "")
	}
	dctx, dcancel := context.WithTimeout(ctx, cfg.DialTimeout)
	defer dcancel()
	id, err := proxy.Probe(dctx, &proxy.TLSDialer{Addr: cfg.Upstream, Config: tc}, proxy.Token(tok))
	if err != nil {
		return fail(proxy.ProbeStep(err), err, proxy.Remedy(err))
	}
	ok("upstream", fmt.Sprintf("TLS to %s as %s, AUTH and PING answered (CLIENT ID %d)", cfg.Upstream, tc.ServerName, id))
	return exitOK
}
