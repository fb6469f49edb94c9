package proxy

import (
	"strconv"
	"testing"
)

// FuzzParseAzureEvent: any message parses or is refused without panicking; a parsed one has a type, and
// the fields it kept, written out again, parse to the same event.
func FuzzParseAzureEvent(f *testing.F) {
	f.Fuzz(func(t *testing.T, msg string) {
		ev, err := parseAzureEvent(msg)
		if err != nil {
			return
		}
		if ev.kind == "" {
			t.Fatalf("%q: parsed without a NotificationType", msg)
		}
		again := "NotificationType|" + ev.kind + "|StartTimeInUTC|" + ev.start + "|IsReplica|" +
			strconv.FormatBool(ev.replica) + "|IPAddress|" + ev.ip + "|SSLPort|" + ev.sslPort
		if ev2, err := parseAzureEvent(again); err == nil && ev2 != ev {
			t.Fatalf("%q: %+v, written out and parsed again %+v", msg, ev, ev2)
		}
	})
}

func TestParseAzureEvent(t *testing.T) {
	for _, tc := range []struct {
		msg  string
		want azureEvent
		ok   bool
	}{
		{"NotificationType|NodeMaintenanceStarting|StartTimeInUTC|2021-12-09T16:34:46|IsReplica|False|IPAddress|10.0.0.4|SSLPort|15001|NonSSLPort|13001",
			azureEvent{kind: "NodeMaintenanceStarting", start: "2021-12-09T16:34:46", ip: "10.0.0.4", sslPort: "15001"}, true},
		{"NotificationType|NodeMaintenanceStart|StartTimeInUTC||IsReplica|True|IPAddress|10.0.0.5|SSLPort|15002|NonSSLPort|13002",
			azureEvent{kind: "NodeMaintenanceStart", replica: true, ip: "10.0.0.5", sslPort: "15002"}, true},
		{"NotificationType|NodeMaintenanceEnded|Future|x", azureEvent{kind: "NodeMaintenanceEnded"}, true},
		{"NotificationType|a|b", azureEvent{}, false},
		{"IsReplica|True", azureEvent{}, false},
		{"", azureEvent{}, false},
	} {
		got, err := parseAzureEvent(tc.msg)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("%q: %+v, %v; want %+v, ok %v", tc.msg, got, err, tc.want, tc.ok)
		}
	}
	if announcementLabel("NodeMaintenanceStart") != "NodeMaintenanceStart" || announcementLabel("Surprise") != "other" {
		t.Error("announcement labels are not the bounded set")
	}
}
