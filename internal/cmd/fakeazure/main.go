// Command fakeazure runs a fake Azure Cache for Redis with Entra ID authentication on loopback
// (see package azurefake) until SIGINT or SIGTERM, for `make demo` and `make bench`.
//
//	go run ./internal/cmd/fakeazure -token-lifetime 20s -env-file /tmp/fake.env
//
// With -cluster it runs a 3+3 Redis Cluster (Azure Managed Redis with the OSS cluster policy).
//
// The env file holds the proxy's settings (KEY=VALUE lines for `set -a; . file` or
// docker --env-file) and FAKEAZURE_* values for redis-cli. It appears, complete, once the fake
// is ready, and is removed at exit. Token and ACL events are logged to stderr.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "fakeazure:", err)
		os.Exit(1)
	}
}

func run() error {
	lifetime := flag.Duration("token-lifetime", time.Hour, "lifetime of each token the identity endpoint issues")
	envFile := flag.String("env-file", "", "write the environment for the proxy here (default: stdout)")
	serverName := flag.String("server-name", "fakecache.redis.cache.windows.net", "DNS name in the server certificate")
	dir := flag.String("dir", "", "working directory (certificates, redis.log); default: a temporary one, removed at exit")
	failEvery := flag.Int("fail-every", 0, "make every n-th token request fail (0: never)")
	failMode := flag.String("fail-mode", "500", "how -fail-every requests fail: 500, hang or garbage")
	cluster := flag.Bool("cluster", false, "a Redis Cluster of 3 primaries and 3 replicas (a clustered cache) instead of one server; the env file names the first primary")
	flag.Parse()
	fault, err := azurefake.ParseFault(*failMode)
	if err != nil {
		return fmt.Errorf("-fail-mode: %w", err)
	}

	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey { // short wall-clock time, to line up with the proxy's log
				return slog.String(a.Key, a.Value.Time().Format("15:04:05.000"))
			}
			return a
		},
	}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	startCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	env, err := azurefake.Start(startCtx, azurefake.Options{
		TokenLifetime: *lifetime, ServerName: *serverName, Dir: *dir, Logger: logger, Cluster: *cluster,
	})
	cancel()
	if err != nil {
		return err
	}
	defer env.Close()
	if *failEvery > 0 {
		env.SetFailEvery(*failEvery, fault)
	}

	if err := writeEnv(*envFile, env); err != nil {
		return err
	}
	if *envFile != "" {
		defer os.Remove(*envFile) // its values die with this process
	}
	logger.Info("fake Azure Cache for Redis ready", "redis", env.RedisAddr, "identity_endpoint", env.IdentityEndpoint,
		"token_lifetime", *lifetime, "env_file", *envFile, "redis_log", filepath.Join(env.Dir, "redis.log"))

	<-ctx.Done()
	logger.Info("shutting down", "tokens_minted", env.Stats().Minted)
	return env.Close()
}

// writeEnv writes the env file atomically (temp file, rename), so that a script waiting for
// it never reads half of it.
func writeEnv(path string, env *azurefake.Env) error {
	user, pass := env.AdminCredentials()
	host, port, _ := strings.Cut(env.RedisAddr, ":")
	lines := append([]string{fmt.Sprintf("# fakeazure (pid %d); valid while it runs", os.Getpid())}, env.ProxyEnv()...)
	lines = append(lines,
		"FAKEAZURE_REDIS_HOST="+host,
		"FAKEAZURE_REDIS_PORT="+port,
		"FAKEAZURE_CA_FILE="+env.CAFile,
		"FAKEAZURE_SERVER_NAME="+env.ServerName,
		"FAKEAZURE_ADMIN_USER="+user,
		"FAKEAZURE_ADMIN_PASSWORD="+pass,
		"FAKEAZURE_DIR="+env.Dir,
	)
	content := strings.Join(lines, "\n") + "\n"
	if path == "" {
		_, err := os.Stdout.WriteString(content)
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o600); err != nil {
		return fmt.Errorf("write env file: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write env file: %w", err)
	}
	return nil
}
