package azurefake

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

const (
	adminUser       = "admin"
	redisStartLimit = 15 * time.Second // redis-server starts in milliseconds; this is for a loaded CI box
	redisStopLimit  = 5 * time.Second  // after SIGTERM, before SIGKILL
	aclTimeout      = 5 * time.Second  // one ACL command on the admin connection
	bindAttempts    = 5                // fresh ports tried when another process takes ours first
)

// errExitedEarly means redis-server exited before it was ready, most often because the
// port picked for it was taken in between.
var errExitedEarly = errors.New("redis-server exited during startup")

// redisProc is one running redis-server.
type redisProc struct {
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has exited and been reaped
}

// redisConfig renders redis.conf for a server working in dir. Everything Azure-like is here:
// TLS only, no default user, no persistence, the commands Options.RenameCommands takes away.
func (e *Env) redisConfig(dir string, port int) string {
	// repl-diskless-sync-delay 0: a primary sends a new replica its data at once (the default waits 5 s
	// for more replicas), so failover tests take seconds.
	q := strconv.Quote
	var b strings.Builder
	fmt.Fprintf(&b, `# written by azurefake
daemonize no
bind 127.0.0.1
port 0
tls-port %d
tls-cert-file %s
tls-key-file %s
tls-ca-cert-file %s
tls-auth-clients no
tls-protocols "TLSv1.2 TLSv1.3"
save ""
appendonly no
dir %s
logfile %s
user default off
user %s on >%s ~* %s+@all
repl-diskless-sync-delay 0
`, port, q(e.path("server.pem")), q(e.path("server-key.pem")), q(e.CAFile),
		q(dir), q(filepath.Join(dir, "redis.log")), adminUser, e.adminPassword, e.allChannels())
	for _, r := range e.renames {
		fmt.Fprintf(&b, "rename-command %s %s\n", r[0], q(r[1]))
	}
	return b.String()
}

// allChannels is the ACL rule, with a trailing space, that allows every pub/sub channel: "&* "
// since 6.2, whose default for new users is to allow none from 7.0 on; nothing on 6.0, which
// has no channel rules and allows every channel.
func (e *Env) allChannels() string {
	if e.version.AtLeast(6, 2) {
		return "&* "
	}
	return ""
}

// startRedisLocked starts redis-server on port and waits until the admin user can PING it.
// The caller holds e.redisMu.
func (e *Env) startRedisLocked(ctx context.Context, port int) error {
	p, err := e.launch(ctx, e.Dir, port, "")
	if err != nil {
		return err
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	e.proc, e.port = p, port
	if e.RedisAddr == "" { // set once, in Start: tests read it without locking
		e.RedisAddr = addr
	}
	e.admin = redis.NewClient(e.adminOptions(addr, 3))
	return nil
}

// launch writes dir/redis.conf (redisConfig, then extra lines), starts redis-server with it and
// waits until the admin user can PING it on port.
func (e *Env) launch(ctx context.Context, dir string, port int, extra string) (*redisProc, error) {
	conf := filepath.Join(dir, "redis.conf")
	if err := os.WriteFile(conf, []byte(e.redisConfig(dir, port)+extra), 0o600); err != nil {
		return nil, fmt.Errorf("write %s: %w", conf, err)
	}
	out, err := os.OpenFile(filepath.Join(dir, "redis.stdout"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open redis output file: %w", err)
	}
	defer out.Close() // the child keeps its own descriptor
	cmd := exec.Command(e.redisPath, conf)
	cmd.Dir, cmd.Stdout, cmd.Stderr = dir, out, out
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", e.redisPath, err)
	}
	p := &redisProc{cmd: cmd, done: make(chan struct{})}
	go func() { // owned by p: ends when the process exits
		_ = cmd.Wait() // the exit status of a stopped server says nothing useful
		close(p.done)
	}()
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	if err := e.awaitReady(ctx, p, dir, addr); err != nil {
		p.stop()
		return nil, err
	}
	return p, nil
}

// adminOptions are go-redis options for the harness's admin connection.
func (e *Env) adminOptions(addr string, maxRetries int) *redis.Options {
	return &redis.Options{
		Addr:            addr,
		Username:        adminUser,
		Password:        e.adminPassword,
		TLSConfig:       e.adminTLSConfig(),
		Protocol:        2, // Azure Cache for Redis is Redis 6: RESP2 replies are what tests expect
		DisableIdentity: true,
		DialTimeout:     time.Second,
		ReadTimeout:     aclTimeout,
		WriteTimeout:    aclTimeout,
		MaxRetries:      maxRetries,
		PoolSize:        4,
	}
}

// awaitReady polls TLS + AUTH + PING until it works, the process exits, or the deadline.
func (e *Env) awaitReady(ctx context.Context, p *redisProc, dir, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, redisStartLimit)
	defer cancel()
	probe := redis.NewClient(e.adminOptions(addr, -1))
	defer probe.Close()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	var err error
	for {
		pctx, pcancel := context.WithTimeout(ctx, time.Second)
		perr := probe.Ping(pctx).Err()
		pcancel()
		if perr == nil {
			return nil
		}
		if err == nil || ctx.Err() == nil {
			err = perr // keep the cause, not the timeout of the last try
		}
		select {
		case <-p.done:
			return fmt.Errorf("%w on %s: %s", errExitedEarly, addr, redisLogTail(dir))
		case <-ctx.Done():
			return fmt.Errorf("redis-server on %s not ready (last probe: %v): %w; %s", addr, err, ctx.Err(), redisLogTail(dir))
		case <-tick.C:
		}
	}
}

// stop terminates the process and reaps it: SIGTERM, then SIGKILL after redisStopLimit.
func (p *redisProc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM) // fails only if it already exited
	select {
	case <-p.done:
		return
	case <-time.After(redisStopLimit):
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

// stopRedisLocked stops redis-server if it runs. The caller holds e.redisMu.
func (e *Env) stopRedisLocked() error {
	err := stopServer(&e.proc, &e.admin)
	if e.replica != nil {
		err = errors.Join(err, stopServer(&e.replica.proc, &e.replica.admin))
	}
	return err
}

// stopServer closes *admin, stops *p if it runs, and sets both to nil (stopped).
func stopServer(p **redisProc, admin **redis.Client) error {
	if *p == nil {
		return nil
	}
	addr, err := (*admin).Options().Addr, (*admin).Close()
	(*p).stop()
	*p, *admin = nil, nil
	if err != nil {
		return fmt.Errorf("close admin connection to %s: %w", addr, err)
	}
	return nil
}

// redisLogTail returns the end of the log and output of the redis-server working in dir, to
// explain a failure.
func redisLogTail(dir string) string {
	const max = 1500
	var s string
	for _, name := range []string{"redis.stdout", "redis.log"} {
		f, err := os.Open(filepath.Join(dir, name))
		if err != nil {
			continue
		}
		if fi, err := f.Stat(); err == nil && fi.Size() > max {
			_, _ = f.Seek(-max, io.SeekEnd)
		}
		b, _ := io.ReadAll(io.LimitReader(f, max))
		f.Close()
		if len(b) > 0 {
			s += fmt.Sprintf("[%s] %s ", name, b)
		}
	}
	if s == "" {
		return "redis-server wrote no log"
	}
	return s
}

// adminTLSConfig is ClientTLSConfig, except that with Options.ExpiredCert it checks the
// server certificate as of a time it was valid: the harness itself must still get in.
func (e *Env) adminTLSConfig() *tls.Config {
	c := e.ClientTLSConfig()
	if !e.expiredCert {
		return c
	}
	c.InsecureSkipVerify = true // replaced by VerifyConnection below
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("no server certificate")
		}
		leaf := cs.PeerCertificates[0]
		inter := x509.NewCertPool()
		for _, ic := range cs.PeerCertificates[1:] {
			inter.AddCert(ic)
		}
		_, err := leaf.Verify(x509.VerifyOptions{
			Roots: e.caPool, Intermediates: inter, DNSName: e.ServerName, CurrentTime: leaf.NotBefore.Add(time.Minute),
		})
		return err
	}
	return c
}

func (e *Env) path(name string) string { return filepath.Join(e.Dir, name) }

// ClientTLSConfig returns a TLS client configuration that trusts this Env's CA and verifies
// ServerName, like a client of Azure Cache for Redis: TLS 1.2 or newer.
func (e *Env) ClientTLSConfig() *tls.Config {
	return &tls.Config{RootCAs: e.caPool, ServerName: e.ServerName, MinVersion: tls.VersionTLS12}
}

// freePort returns a loopback TCP port that was free a moment ago. Another process may take
// it before redis-server binds it; Start then retries with another.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	return port, nil
}
