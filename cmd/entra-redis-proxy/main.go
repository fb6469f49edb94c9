// Command entra-redis-proxy lets any Redis client use Azure Cache for Redis with Microsoft Entra ID: apps
// connect in plaintext to a local port, and the proxy authenticates their connections with Entra tokens and
// re-authenticates them as the tokens rotate. Run with --help for the settings.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"

	"github.com/kelseyhightower/envconfig"
)

// version is set at build time: -ldflags "-X main.version=v1.2.3".
var version = "dev"

// Exit codes. A shutdown that drained every connection exits 0, whatever started it: 143 (128+SIGTERM, what
// a process killed by the signal reports) would fail a Kubernetes Job whose sidecar stopped cleanly.
const (
	exitOK      = 0
	exitRuntime = 1 // failed while running (the listener), or connections had to be cut at shutdown
	exitConfig  = 2 // invalid configuration
	exitCheck   = 3 // `check` found a problem
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		switch args[0] {
		case "-h", "--help", "-help", "help":
			usage(stdout)
			return exitOK
		case "-v", "--version", "-version", "version":
			fmt.Fprintf(stdout, "entra-redis-proxy %s\n", version)
			return exitOK
		case "check":
		default:
			fmt.Fprintf(stderr, "entra-redis-proxy: unknown argument %q; settings come from environment variables, see --help\n", args[0])
			return exitConfig
		}
	}
	cfg, err := loadConfig()
	if err != nil {
		fmt.Fprintf(stderr, "entra-redis-proxy: invalid configuration: %v\n", err)
		return exitConfig
	}
	if len(args) > 0 && args[0] == "check" {
		return runCheck(context.Background(), cfg, stdout)
	}
	logger, err := newLogger(cfg, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "entra-redis-proxy: %v\n", err)
		return exitConfig
	}
	// The first signal starts the shutdown, the next forces it (see serve): both must reach serve.
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(signals)
	return serve(signals, cfg, logger)
}

func usage(w io.Writer) {
	fmt.Fprint(w, `entra-redis-proxy: a local Redis endpoint that authenticates to Azure Cache for Redis with Microsoft Entra ID.

Usage:
  entra-redis-proxy            run the proxy
  entra-redis-proxy check      check the configuration, the token, the upstream and AUTH, then exit
  entra-redis-proxy --version  print the version

Settings (environment variables):
`)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VARIABLE\tDEFAULT\tMEANING")
	envconfig.Usagef("", &Config{}, tw, "{{range .}}{{usage_key .}}\t{{usage_default .}}{{if usage_required .}}(required){{end}}\t{{usage_description .}}\n{{end}}")
	tw.Flush()
	fmt.Fprint(w, `
azidentity's own variables (AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET, AZURE_CLIENT_CERTIFICATE_PATH,
AZURE_FEDERATED_TOKEN_FILE, ...) configure the credential as they do for any Azure SDK program.
`)
}
