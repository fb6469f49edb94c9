package proxy_test

import (
	"fmt"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// pipeNodes are the fake cluster's nodes: upstream address -> the local listener the proxy names.
var pipeNodes = map[string]string{
	"10.0.0.1:7000": "127.0.0.1:16380", "10.0.0.2:7001": "127.0.0.1:16381", "10.0.0.3:7002": "127.0.0.1:16382",
}

// newClusterPipeEnv is newPipeEnv with a Cluster that knows pipeNodes (its seed is 10.0.0.1).
func newClusterPipeEnv(t *testing.T) *pipeEnv {
	return newPipeEnv(t, func(o *proxy.Options) {
		cl := proxy.NewCluster(proxy.ClusterConfig{SeedHost: "10.0.0.1", ListenHost: "127.0.0.1", Server: *o})
		proxy.SetClusterNodes(cl, pipeNodes)
		o.Cluster = cl
	})
}

// slotsReply is a RESP2 CLUSTER SLOTS reply naming the two given nodes (host, port).
func slotsReply(h1 string, p1 int, h2 string, p2 int) string {
	node := func(h string, p int, id string) string {
		return "*3\r\n" + bulkOf(h) + ":" + strconv.Itoa(p) + "\r\n" + bulkOf(id)
	}
	return "*2\r\n" + "*3\r\n:0\r\n:8191\r\n" + node(h1, p1, strings.Repeat("2", 40)) +
		"*3\r\n:8192\r\n:16383\r\n" + node(h2, p2, strings.Repeat("3", 40))
}

// nodesText is CLUSTER NODES text of n lines, each naming one of addrs in turn.
func nodesText(n int, addrs ...string) string {
	var b strings.Builder
	for i := range n {
		fmt.Fprintf(&b, "%040x %s@17001 master - 0 1700000000000 1 connected %d\n", i, addrs[i%len(addrs)], i)
	}
	return b.String()
}

// TestPipeClusterExecElements: inside a transaction's reply, the elements of the topology commands
// queued in MULTI and a redirect get the local addresses (their lengths recomputed), every other
// element passes as sent, and so does each +QUEUED; the EXEC reply cut at every byte, and a
// redirect after it cut at every byte too.
func TestPipeClusterExecElements(t *testing.T) {
	slotsUp, slotsLocal := slotsReply("10.0.0.2", 7001, "10.0.0.3", 7002), slotsReply("127.0.0.1", 16381, "127.0.0.1", 16382)
	nodesUp, nodesLocal := bulkOf(nodesText(3, "10.0.0.2:7001", "10.0.0.3:7002")), bulkOf(nodesText(3, "127.0.0.1:16381", "127.0.0.1:16382"))
	const movedUp, movedLocal = "-MOVED 3999 10.0.0.3:7002\r\n", "-MOVED 3999 127.0.0.1:16382\r\n"
	const askUp, askLocal = "-ASK 12 :7001\r\n", "-ASK 12 127.0.0.1:16381\r\n" // an empty host is the seed's
	unknown := "-ERR unknown command 'FOO' (not scripted in the fake upstream)\r\n"
	execUp := "*4\r\n" + slotsUp + movedUp + nodesUp + unknown
	want := "+OK\r\n" + strings.Repeat("+QUEUED\r\n", 4) + "*4\r\n" + slotsLocal + movedLocal + nodesLocal + unknown +
		strings.Replace(askLocal, "16381", "16380", 1) + slotsLocal
	synctest.Test(t, func(t *testing.T) {
		e := newClusterPipeEnv(t)
		e.fake.handle("CLUSTER", func(c *fakeConn, args []string) {
			switch strings.ToUpper(args[1]) {
			case "SLOTS":
				c.reply(slotsUp)
			case "NODES":
				c.reply(nodesUp)
			}
		})
		e.fake.handle("GET", func(c *fakeConn, args []string) {
			if args[1] == "a" {
				c.reply(movedUp) // (inside EXEC: an element)
				return
			}
			k, _ := strconv.Atoi(args[1])
			c.chunked(strings.Replace(askUp, "7001", "7000", 1), []int{k % len(askUp)}, time.Millisecond)
		})
		var bad []string
		for k := 1; k < len(execUp); k++ {
			e.fake.mu.Lock()
			e.fake.execCut = k
			e.fake.mu.Unlock()
			c := e.connect("cut " + strconv.Itoa(k))
			c.send(cmd("MULTI"), cmd("CLUSTER", "SLOTS"), cmd("GET", "a"), cmd("CLUSTER", "NODES"), cmd("FOO"), cmd("EXEC"),
				cmd("GET", strconv.Itoa(k)), cmd("CLUSTER", "SLOTS"))
			time.Sleep(time.Second)
			synctest.Wait()
			if got := c.got(); got != want {
				bad = append(bad, fmt.Sprintf("cut at %d: %s", k, diffBytes(got, want)))
			}
			c.c.Close()
		}
		if len(bad) > 0 {
			t.Errorf("%d of %d cuts differ; first: %s", len(bad), len(execUp)-1, bad[0])
		}
	})
}

// TestPipeClusterExecLargeTopology: a CLUSTER NODES queued in MULTI whose element is larger than
// the read buffer (held whole, up to the head bound, as outside MULTI), in RESP3 (a verbatim string).
func TestPipeClusterExecLargeTopology(t *testing.T) {
	up := nodesText(400, "10.0.0.2:7001", "10.0.0.3:7002") // about 38 KB
	local := nodesText(400, "127.0.0.1:16381", "127.0.0.1:16382")
	verbatim := func(s string) string { return "=" + strconv.Itoa(len(s)+4) + "\r\ntxt:" + s + "\r\n" }
	synctest.Test(t, func(t *testing.T) {
		e := newClusterPipeEnv(t)
		e.fake.handle("CLUSTER", func(c *fakeConn, args []string) { c.reply(verbatim(up)) })
		c := e.connect("large")
		c.send(cmd("HELLO", "3"))
		synctest.Wait()
		hello := c.got()
		c.send(cmd("MULTI"), cmd("PING"), cmd("CLUSTER", "NODES"), cmd("PING"), cmd("EXEC"))
		time.Sleep(time.Second)
		synctest.Wait()
		c.expect("EXEC with a large CLUSTER NODES", hello+"+OK\r\n"+strings.Repeat("+QUEUED\r\n", 3)+
			"*3\r\n+PONG\r\n"+verbatim(local)+"+PONG\r\n")
	})
}

// TestPipeClusterExecMoved: EXEC itself answered -MOVED (OSS redis, when a queued key's slot moved
// before EXEC): the redirect names the node listener, with a topology command queued (whose
// element never comes) and without.
func TestPipeClusterExecMoved(t *testing.T) {
	const up, local = "-MOVED 866 10.0.0.2:7001\r\n", "-MOVED 866 127.0.0.1:16381\r\n"
	synctest.Test(t, func(t *testing.T) {
		e := newClusterPipeEnv(t)
		e.fake.mu.Lock()
		e.fake.execErr = up
		e.fake.mu.Unlock()
		c := e.connect("moved exec")
		c.send(cmd("MULTI"), cmd("GET", "k"), cmd("EXEC"), cmd("MULTI"), cmd("CLUSTER", "SLOTS"), cmd("EXEC"))
		time.Sleep(time.Second)
		synctest.Wait()
		c.expect("EXEC answered MOVED", "+OK\r\n+QUEUED\r\n"+local+"+OK\r\n+QUEUED\r\n"+local)
	})
}
