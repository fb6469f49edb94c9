package proxy_test

import (
	"slices"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/entra-redis-proxy/entra-redis-proxy/proxy"
)

// optIn is what the proxy's control connection sends to turn maintenance notifications on (the fake is no
// TLSDialer with an address, so the proxy asks for public addresses).
const optIn = "CLIENT MAINT_NOTIFICATIONS ON moving-endpoint-type external-ip"

// notificationsEnv is a reconnectEnv whose server opts in to maintenance notifications; it returns the
// control connection, on which the test sends them.
func notificationsEnv(t *testing.T) (*pipeEnv, *diffObserver, *fakeConn) {
	return controlEnv(t, func(o *proxy.Options) { o.MaintNotifications = true }, optIn)
}

// notification is a maintenance notification push: its type, a sequence number, then args as bulks.
func notification(kind string, seq int, args ...string) string {
	s := ">" + strconv.Itoa(2+len(args)) + "\r\n" + bulkOf(kind) + ":" + strconv.Itoa(seq) + "\r\n"
	for _, a := range args {
		s += bulkOf(a)
	}
	return s
}

// The control connection opts in over RESP3 (HELLO 3 first), and takes a new token without being closed:
// its AUTH's reply comes among the pushes.
func TestNotificationsControlConnection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, _, ctrl := notificationsEnv(t)
		e.rotate()
		synctest.Wait()
		time.Sleep(3 * time.Minute) // past an idle PING
		synctest.Wait()
		got := strings.Join(ctrl.Commands(), ", ")
		if want := ", HELLO 3, " + optIn + ", AUTH oid-1 tok-2, PING"; !strings.HasSuffix(got, want) {
			t.Errorf("the control connection received %q; want the handshake, then %q", got, want[2:])
		}
		if closedByProxy(ctrl) {
			t.Error("the control connection was closed at the new token")
		}
	})
}

// A server without maintenance notifications (Redis OSS: Azure Cache for Redis) refuses the opt-in: the
// proxy closes that connection and never asks again.
func TestNotificationsRefused(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newPipeEnv(t, func(o *proxy.Options) {
			o.MaintNotifications = true
			o.Dialer.(*fakeUpstream).handle("CLIENT", func(c *fakeConn, args []string) {
				if strings.EqualFold(args[1], "ID") {
					c.reply(":" + strconv.FormatInt(c.id, 10) + "\r\n")
					return
				}
				c.reply("-ERR unknown subcommand '" + args[1] + "'. Try CLIENT HELP.\r\n")
			})
		})
		synctest.Wait()
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		var asked []*fakeConn
		for _, c := range e.fake.Conns() {
			if slices.Contains(c.Commands(), optIn) {
				asked = append(asked, c)
			}
		}
		if len(asked) != 1 || !closedByProxy(asked[0]) {
			t.Errorf("%d connections asked for maintenance notifications; want 1, closed by the proxy", len(asked))
		}
	})
}

// From MIGRATING (or FAILING_OVER) to MIGRATED (FAILED_OVER) a reply may stop halfway for longer than
// StallTimeout, as during an announced maintenance.
func TestNotificationsRelaxStallLimit(t *testing.T) {
	for _, kinds := range [][2]string{{"MIGRATING", "MIGRATED"}, {"FAILING_OVER", "FAILED_OVER"}} {
		t.Run(kinds[0], func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				e, obs, ctrl := notificationsEnv(t)
				reply := bulkOf("a value that arrives in two pieces")
				splitReply(e.fake, reply, len(reply), 2*pipeStall)
				notified := func(kind string) *pipeClient {
					ctrl.write([]byte(notification(kind, 1, "30", "1")))
					synctest.Wait()
					c := e.connect(kind)
					c.send(cmd("GET", "split:5"))
					time.Sleep(3 * pipeStall)
					synctest.Wait()
					return c
				}
				c := notified(kinds[0])
				c.expect("a reply that stopped halfway for 2 StallTimeouts during the maintenance", reply)
				c.expectOpen("during the maintenance")
				if err, _ := notified(kinds[1]).ended(); err == nil {
					t.Errorf("after %s, a reply that stopped halfway for 2 StallTimeouts did not close the connection", kinds[1])
				}
				expectMechanisms(t, obs, "")
			})
		})
	}
}

// MOVING moves every session at its next safe point, as NodeMaintenanceStart does; the control connection
// itself is dialed again (the fake has one address, so the new connections land on it).
func TestNotificationsMovingMovesSessions(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, obs, ctrl := notificationsEnv(t)
		kv := e.connect("kv")
		kv.send(cmd("SELECT", "2"), cmd("ECHO", "before"))
		synctest.Wait()
		kvUp := e.fake.Conns()[len(e.fake.Conns())-1]
		ctrl.write([]byte(notification("MOVING", 7, "15", "10.0.0.9:10000")))
		synctest.Wait()
		if !closedByProxy(kvUp) || !closedByProxy(ctrl) {
			t.Errorf("after MOVING: session's old upstream closed %v, control connection closed %v; want both",
				closedByProxy(kvUp), closedByProxy(ctrl))
		}
		kv.send(cmd("ECHO", "after"))
		synctest.Wait()
		kv.expect("kv", "+OK\r\n"+bulkOf("before")+bulkOf("after"))
		expectMechanisms(t, obs, "maintenance_move=1")
	})
}

// MOVING without an endpoint (null): the same address reaches the new place later, so the sessions move at
// half the time given, not at once.
func TestNotificationsMovingToSameEndpoint(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e, obs, ctrl := notificationsEnv(t)
		kv := e.connect("kv")
		kv.send(cmd("ECHO", "before"))
		synctest.Wait()
		kvUp := e.fake.Conns()[len(e.fake.Conns())-1]
		ctrl.write([]byte(">4\r\n" + bulkOf("MOVING") + ":8\r\n:10\r\n_\r\n"))
		time.Sleep(4 * time.Second)
		synctest.Wait()
		if closedByProxy(kvUp) {
			t.Error("moved before half the time given")
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if !closedByProxy(kvUp) || closedByProxy(ctrl) {
			t.Errorf("after half the time: session moved %v (want true), control connection closed %v (want false)",
				closedByProxy(kvUp), closedByProxy(ctrl))
		}
		kv.send(cmd("ECHO", "after"))
		synctest.Wait()
		kv.expect("kv", bulkOf("before")+bulkOf("after"))
		expectMechanisms(t, obs, "maintenance_move=1")
	})
}
