package proxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/azurefake"
	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
	"github.com/entra-redis-proxy/entra-redis-proxy/resp"
)

// clusterFixture is the azurefake 3+3 TLS cluster, a proxy at its first primary (the seed) with a
// Cluster, and the Cluster's node listeners.
type clusterFixture struct {
	*fixture
	cluster *proxy.Cluster
	tls     *tls.Config // a direct client's
	logged  *logCount
}

// newClusterFixture starts the fixture; each configure may change the proxy's options and the
// Cluster's before they are used.
func newClusterFixture(t *testing.T, lifetime time.Duration, configure ...func(*proxy.Options, *proxy.ClusterConfig)) *clusterFixture {
	t.Helper()
	env := azurefake.StartT(t, azurefake.Options{Cluster: true, TokenLifetime: lifetime})
	tc := env.ClientTLSConfig()
	first, err := azurefake.FreePortRange(8)
	if err != nil {
		t.Fatal(err)
	}
	var cl *proxy.Cluster
	logged := &logCount{n: map[string]int{}}
	f := newProxyFor(t, env, fixtureOpts{proxyOpt: func(o *proxy.Options) {
		o.Logger = slog.New(&countHandler{Handler: o.Logger.Handler(), c: logged})
		cc := proxy.ClusterConfig{Seed: o.Dialer, SeedHost: "127.0.0.1", TLS: tc, ListenHost: "127.0.0.1",
			FirstPort: first, LastPort: first + 7}
		for _, c := range configure {
			c(o, &cc)
		}
		cc.Server = *o
		cl = proxy.NewCluster(cc)
		o.Cluster = cl
	}})
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if cut := cl.Shutdown(ctx); cut > 0 {
			t.Errorf("%d node listener clients still open at the end", cut)
		}
	})
	topo, err := cl.Detect(t.Context())
	if err != nil {
		t.Fatalf("Detect: %v", err)
	}
	if len(topo.Nodes) != 6 || topo.Covered != 16384 {
		t.Fatalf("Detect: %v", topo)
	}
	return &clusterFixture{fixture: f, cluster: cl, tls: tc, logged: logged}
}

// logCount counts the proxy's log messages by their first words.
type logCount struct {
	mu sync.Mutex
	n  map[string]int
}

func (c *logCount) count(prefix string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	total := 0
	for m, n := range c.n {
		if strings.HasPrefix(m, prefix) {
			total += n
		}
	}
	return total
}

type countHandler struct {
	slog.Handler
	c *logCount
}

func (h *countHandler) Handle(ctx context.Context, r slog.Record) error {
	h.c.mu.Lock()
	h.c.n[r.Message]++
	h.c.mu.Unlock()
	return h.Handler.Handle(ctx, r)
}

func (h *countHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &countHandler{Handler: h.Handler.WithAttrs(as), c: h.c}
}

func (h *countHandler) WithGroup(name string) slog.Handler {
	return &countHandler{Handler: h.Handler.WithGroup(name), c: h.c}
}

// clusterClient returns a go-redis ClusterClient seeded with addr; with tc, over TLS as the token's
// user (a direct client).
func clusterClient(t *testing.T, addr string, protocol int, tc *tls.Config, user, pass string) *redis.ClusterClient {
	c := redis.NewClusterClient(&redis.ClusterOptions{
		Addrs: []string{addr}, Protocol: protocol, TLSConfig: tc, Username: user, Password: pass,
		DisableIdentity: true, ReadTimeout: 10 * time.Second,
	})
	t.Cleanup(func() { c.Close() })
	return c
}

// TestClusterClients: go-redis ClusterClient (RESP2 and RESP3) at the proxy's LISTEN reaches every
// node through the node listeners only, and sees what a direct ClusterClient sees: keys over all
// slots, a transaction on one slot, the topology with local addresses.
func TestClusterClients(t *testing.T) {
	f := newClusterFixture(t, 2*time.Minute)
	tok, _ := f.src.Current()
	_, locals := f.cluster.Topology()
	for _, protocol := range []int{2, 3} {
		t.Run("RESP"+strconv.Itoa(protocol), func(t *testing.T) {
			ctx := t.Context()
			px := clusterClient(t, f.addr, protocol, nil, "", "")
			direct := clusterClient(t, f.env.RedisAddr, protocol, f.tls, tok.Username, tok.Secret)
			slots, err := px.ClusterSlots(ctx).Result()
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range slots {
				for _, n := range r.Nodes {
					if !containsValue(locals, n.Addr) {
						t.Fatalf("CLUSTER SLOTS through the proxy names %s, not a node listener (%v)", n.Addr, locals)
					}
				}
			}
			prefix := "p" + strconv.Itoa(protocol) + ":"
			for i := range 300 { // about 100 keys per primary
				k := prefix + strconv.Itoa(i)
				if err := px.Set(ctx, k, i, 0).Err(); err != nil {
					t.Fatalf("SET %s through the proxy: %v", k, err)
				}
				if got, err := direct.Get(ctx, k).Int(); err != nil || got != i {
					t.Fatalf("GET %s direct: %v, %v; want %d", k, got, err, i)
				}
			}
			// MULTI on one slot: {tag} keeps the keys together.
			cmds, err := px.TxPipelined(ctx, func(p redis.Pipeliner) error {
				p.Incr(ctx, prefix+"{tx}a")
				p.Incr(ctx, prefix+"{tx}b")
				return nil
			})
			if err != nil || len(cmds) != 2 {
				t.Fatalf("MULTI/EXEC on one slot: %v, %v", cmds, err)
			}
			// A plain (non-cluster) client of the proxy's LISTEN gets MOVED with a local address.
			plain := redis.NewClient(&redis.Options{Addr: f.addr, Protocol: protocol, DisableIdentity: true, MaxRetries: -1})
			defer plain.Close()
			moved := 0
			for i := range 20 {
				err := plain.Get(ctx, prefix+strconv.Itoa(i)).Err()
				if err == nil {
					continue
				}
				addr, ok := strings.CutPrefix(err.Error(), "MOVED ")
				_, addr, _ = strings.Cut(addr, " ")
				if !ok || !containsValue(locals, addr) {
					t.Fatalf("GET through the seed's listener: %v; want MOVED to a node listener", err)
				}
				moved++
			}
			if moved == 0 {
				t.Fatal("no key of 20 lives on another node than the seed")
			}
			if f.atLeast(7, 0) { // a refused SSUBSCRIBE (sharded pub/sub is Redis 7) names the shard's node
				movedSub := false
				for i := 0; i < 20 && !movedSub; i++ {
					c, err := net.Dial("tcp", f.addr)
					if err != nil {
						t.Fatal(err)
					}
					c.SetDeadline(time.Now().Add(10 * time.Second))
					ch := prefix + strconv.Itoa(i)
					fmt.Fprintf(c, "*2\r\n$10\r\nSSUBSCRIBE\r\n$%d\r\n%s\r\n", len(ch), ch)
					line, err := bufio.NewReader(c).ReadString('\n')
					c.Close()
					if err != nil {
						t.Fatal(err)
					}
					if line[0] != '-' {
						continue // confirmed: the channel's slot is the seed's
					}
					addr, ok := strings.CutPrefix(strings.TrimSpace(line), "-MOVED ")
					_, addr, _ = strings.Cut(addr, " ")
					if !ok || !containsValue(locals, addr) {
						t.Fatalf("SSUBSCRIBE %s through the seed's listener: %q; want MOVED to a node listener", ch, line)
					}
					movedSub = true
				}
				if !movedSub {
					t.Fatal("no shard channel of 20 lives on another node than the seed")
				}
			}
			if n := f.logged.count("a client on LISTEN got MOVED"); n != 1 {
				t.Fatalf("the remedy for MOVED on LISTEN was logged %d times, want once per process", n)
			}
			clusterExact(t, f, protocol, prefix)
		})
	}
}

// clusterExact sends the same bytes to the seed directly (TLS) and through the proxy's LISTEN, and
// compares what comes back, after mapping the direct reply's node addresses to the node listeners
// (the test's own mapping, not the proxy's) and zeroing what changes from one call to the next
// (CLUSTER NODES ping/pong times, CLUSTER SHARDS replication offsets): topology commands queued in
// MULTI (their EXEC elements), queued commands on other nodes (-MOVED, then EXEC's error: -EXECABORT, or -CROSSSLOT when the seed's keys are in two slots), the
// topology commands outside MULTI, BLPOPs (redirected, or timing out), and a pipeline of 3,000 GETs, most of them redirected, whose
// replies span many reads.
func clusterExact(t *testing.T, f *clusterFixture, protocol int, prefix string) {
	t.Helper()
	topo, locals := f.cluster.Topology()
	var primary string
	for _, n := range topo.Nodes {
		if n.Primary {
			primary = n.ID
		}
	}
	topoCmds := [][]string{{"CLUSTER", "SLOTS"}, {"CLUSTER", "NODES"}, {"CLUSTER", "REPLICAS", primary}}
	if !f.atLeast(7, 0) {
		topoCmds[2][1] = "SLAVES"
	} else {
		topoCmds = append(topoCmds, []string{"CLUSTER", "SHARDS"})
	}
	var script [][]string
	script = append(append(append(script, []string{"MULTI"}), topoCmds...), []string{"EXEC"})
	script = append(script, []string{"MULTI"})
	for i := range 10 { // (a third of the keys are on the seed: some MOVED is all but certain)
		script = append(script, []string{"GET", prefix + strconv.Itoa(i)})
	}
	script = append(append(script, []string{"EXEC"}), topoCmds...)
	for i := range 6 { // blocking commands: MOVED at once, or a timeout after 10 ms
		script = append(script, []string{"BLPOP", prefix + "list" + strconv.Itoa(i), "0.01"})
	}
	for i := range 3000 {
		script = append(script, []string{"GET", prefix + strconv.Itoa(i%300)})
	}
	var req []byte
	for _, c := range script {
		req = resp.AppendCommand(req, c...)
	}
	tok, _ := f.src.Current()
	run := func(c net.Conn, setup ...[]string) []byte {
		t.Helper()
		defer c.Close()
		d := &diffConn{c: c}
		deadline := time.Now().Add(30 * time.Second)
		for _, cmd := range setup { // not compared: HELLO's connection id differs
			d.write(resp.AppendCommand(nil, cmd...))
			if got, ok, err := d.readFrames(1, deadline); !ok || got[0] == '-' {
				t.Fatalf("%s: %q, %v", cmd[0], got, err)
			}
		}
		d.write(req)
		got, ok, err := d.readFrames(len(script), deadline)
		if !ok {
			t.Fatalf("the script's replies (%d bytes so far): %v", len(got), err)
		}
		return got
	}
	dc, err := tls.Dial("tcp", f.env.RedisAddr, f.tls)
	if err != nil {
		t.Fatal(err)
	}
	pc, err := net.Dial("tcp", f.addr)
	if err != nil {
		t.Fatal(err)
	}
	directSetup := [][]string{{"AUTH", tok.Username, tok.Secret}}
	var proxySetup [][]string
	if protocol == 3 {
		directSetup = append(directSetup, []string{"HELLO", "3"})
		proxySetup = [][]string{{"HELLO", "3"}}
	}
	direct, proxied := run(dc, directSetup...), run(pc, proxySetup...)
	want, got := normTopo(mapToLocals(direct, locals)), normTopo(proxied)
	if d := diffBytes(string(got), string(want)); d != "" {
		t.Fatalf("RESP%d: through the proxy vs direct with addresses mapped: %s", protocol, d)
	}
	if !bytes.Contains(proxied, []byte("-MOVED ")) {
		t.Fatalf("RESP%d: no MOVED in the replies: the script did not test them", protocol)
	}
	t.Logf("RESP%d: %d bytes of replies alike", protocol, len(proxied))
}

var (
	hostPort  = regexp.MustCompile(`127\.0\.0\.1:(\d+)`)                                 // NODES lines, MOVED
	slotsPort = regexp.MustCompile(`(\$9\r\n127\.0\.0\.1\r\n:)(\d+)(\r\n)`)              // SLOTS: host, then port
	shardPort = regexp.MustCompile(`(\$4\r\nport\r\n:|\$8\r\ntls-port\r\n:)(\d+)(\r\n)`) // SHARDS
	pingPong  = regexp.MustCompile(`([0-9a-f]{40} \S+ \S+ \S+) \d+ \d+ `)
	replOff   = regexp.MustCompile(`(replication-offset\r\n:)\d+`)
	nodesStr  = regexp.MustCompile(`[$=]\d+\r\n((?:txt:)?[0-9a-f]{40} [^\r]*)\r\n`)
)

// mapToLocals replaces, in a direct reply, each node's port with its listener's (all hosts are
// 127.0.0.1 on both sides), and a TLS-only node's "tls-port" key in CLUSTER SHARDS with "port", as
// the node listeners are plain. CLUSTER NODES lengths are recomputed by normTopo.
func mapToLocals(b []byte, locals map[string]string) []byte {
	local := func(port string) string {
		l, ok := locals["127.0.0.1:"+port]
		if !ok {
			return port
		}
		return l[len("127.0.0.1:"):]
	}
	b = hostPort.ReplaceAllFunc(b, func(m []byte) []byte { return []byte("127.0.0.1:" + local(string(m[len("127.0.0.1:"):]))) })
	b = slotsPort.ReplaceAllFunc(b, func(m []byte) []byte {
		g := slotsPort.FindSubmatch(m)
		return []byte(string(g[1]) + local(string(g[2])) + "\r\n")
	})
	return shardPort.ReplaceAllFunc(b, func(m []byte) []byte {
		g := shardPort.FindSubmatch(m)
		return []byte("$4\r\nport\r\n:" + local(string(g[2])) + "\r\n")
	})
}

// normTopo zeroes the CLUSTER NODES ping/pong times and CLUSTER SHARDS replication offsets, and
// recomputes the length of each CLUSTER NODES string.
func normTopo(b []byte) []byte {
	b = pingPong.ReplaceAll(b, []byte("$1 0 0 "))
	b = replOff.ReplaceAll(b, []byte("${1}0"))
	return nodesStr.ReplaceAllFunc(b, func(m []byte) []byte {
		text := nodesStr.FindSubmatch(m)[1]
		return []byte(fmt.Sprintf("%c%d\r\n%s\r\n", m[0], len(text), text))
	})
}

func containsValue(m map[string]string, v string) bool {
	for _, x := range m {
		if x == v {
			return true
		}
	}
	return false
}

// TestClusterRedisCLI: redis-cli -c at the proxy's LISTEN follows the rewritten redirects.
func TestClusterRedisCLI(t *testing.T) {
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		t.Fatalf("redis-cli not found (apt-get install redis-tools): %v", err)
	}
	f := newClusterFixture(t, 2*time.Minute)
	host, port, _ := net.SplitHostPort(f.addr)
	for i := range 10 {
		k, v := "cli:"+strconv.Itoa(i), "v"+strconv.Itoa(i)
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		out, err := exec.CommandContext(ctx, cli, "-c", "-h", host, "-p", port, "SET", k, v).CombinedOutput()
		if err == nil {
			out, err = exec.CommandContext(ctx, cli, "-c", "-h", host, "-p", port, "GET", k).CombinedOutput()
		}
		cancel()
		if err != nil || strings.TrimSpace(string(out)) != v {
			t.Fatalf("redis-cli -c SET/GET %s: %q, %v", k, out, err)
		}
	}
}
