package azurefake

import (
	"strings"
	"testing"
	"time"
)

// A maintenance publishes the five announcements in order, and closes the connections that existed when
// NodeMaintenanceStart was published, and only those.
func TestRunMaintenance(t *testing.T) {
	e := StartT(t, Options{TokenLifetime: 2 * time.Minute})
	before := tokenConn(t, e)
	sub := mustDial(t, e) // the admin's connections survive: it hears every announcement
	user, pass := e.AdminCredentials()
	if got, err := sub.do("AUTH", user, pass); got != "+OK" {
		t.Fatalf("AUTH admin: %q %v", got, err)
	}
	if got, err := sub.do("SUBSCRIBE", EventsChannel); got != "*3" || err != nil {
		t.Fatalf("SUBSCRIBE: %q %v", got, err)
	}
	for range 5 { // the rest of the confirmation: $9 subscribe $16 AzureRedisEvents :1
		if _, err := sub.r.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
	}

	done := make(chan error, 1)
	go func() {
		done <- e.RunMaintenance(t.Context(), Maintenance{Starting: 50 * time.Millisecond, Close: 200 * time.Millisecond,
			Failover: 50 * time.Millisecond})
	}()
	var after *respConn
	for _, want := range []string{"NodeMaintenanceScheduled", "NodeMaintenanceStarting", "NodeMaintenanceStart",
		"NodeMaintenanceFailoverComplete", "NodeMaintenanceEnded"} {
		msg := readMessage(t, sub)
		if !strings.HasPrefix(msg, "NotificationType|"+want+"|StartTimeInUTC|") ||
			!strings.Contains(msg, "|IsReplica|False|IPAddress|127.0.0.1|SSLPort|") {
			t.Fatalf("announcement %q, want a %s message in Azure's format", msg, want)
		}
		if want == "NodeMaintenanceStart" {
			after = tokenConn(t, e) // opened after Start: survives
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if err := before.waitClosed(time.Now().Add(5 * time.Second)); err != nil {
		t.Errorf("connection open at Start: %v", err)
	}
	if got, err := after.do("PING"); got != "+PONG" {
		t.Errorf("connection opened after Start: PING %q, %v", got, err)
	}
}

// readMessage reads one RESP2 pub/sub message and returns its payload.
func readMessage(t *testing.T, c *respConn) string {
	t.Helper()
	c.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var lines []string
	for len(lines) < 7 { // *3, $7, message, $N, channel, $N, payload
		line, err := c.r.ReadString('\n')
		if err != nil {
			t.Fatalf("reading a message: %v (so far %q)", err, lines)
		}
		lines = append(lines, strings.TrimSuffix(line, "\r\n"))
	}
	if lines[2] != "message" || lines[4] != EventsChannel {
		t.Fatalf("not a message on %s: %q", EventsChannel, lines)
	}
	return lines[6]
}
