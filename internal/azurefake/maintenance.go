package azurefake

import (
	"context"
	"fmt"
	"net"
	"strings"
	"time"
)

// EventsChannel is the pub/sub channel Azure Cache for Redis announces maintenance on.
const EventsChannel = "AzureRedisEvents"

// Maintenance is a planned maintenance of one node, as Azure Cache for Redis announces it on AzureRedisEvents
// (Azure/AzureCacheForRedis, AzureRedisEvents.md). The offsets are Azure's, scaled down for tests; a zero
// offset publishes at once.
type Maintenance struct {
	Scheduled time.Duration // NodeMaintenanceScheduled this long before Starting (Azure: 10-15 min before the start)
	Starting  time.Duration // NodeMaintenanceStarting this long before Start (Azure: ~20 s)
	Close     time.Duration // after Start, the node closes its connections (Azure: < 5 s)
	Failover  time.Duration // then NodeMaintenanceFailoverComplete this long after the close
	Ended     time.Duration // then NodeMaintenanceEnded this long after FailoverComplete
	// Replica: the replica is maintained (IsReplica True): no connection is closed.
	Replica bool
}

// RunMaintenance publishes m's announcements in order, and at the close kills every client connection that
// existed when NodeMaintenanceStart was published (but the admin's), as a failover does: connections opened
// after it survive, as on the new primary behind Azure's load balancer. It returns after
// NodeMaintenanceEnded, or with ctx's error.
func (e *Env) RunMaintenance(ctx context.Context, m Maintenance) error {
	startAt := time.Now().Add(m.Scheduled + m.Starting)
	if err := e.announce(ctx, "NodeMaintenanceScheduled", startAt, m.Replica); err != nil {
		return err
	}
	if err := sleepCtx(ctx, m.Scheduled); err != nil {
		return err
	}
	if err := e.announce(ctx, "NodeMaintenanceStarting", startAt, m.Replica); err != nil {
		return err
	}
	if err := sleepCtx(ctx, m.Starting); err != nil {
		return err
	}
	doomed, err := e.clientIDs(ctx) // before Start: what the proxy opens on hearing it survives
	if err != nil {
		return err
	}
	if err := e.announce(ctx, "NodeMaintenanceStart", time.Time{}, m.Replica); err != nil {
		return err
	}
	if err := sleepCtx(ctx, m.Close); err != nil {
		return err
	}
	if !m.Replica {
		for _, id := range doomed {
			if _, err := e.Admin(ctx, "CLIENT", "KILL", "ID", id); err != nil && !strings.Contains(err.Error(), "No such client") {
				return fmt.Errorf("close connection %s: %w", id, err)
			}
		}
	}
	if err := sleepCtx(ctx, m.Failover); err != nil {
		return err
	}
	if err := e.announce(ctx, "NodeMaintenanceFailoverComplete", time.Time{}, m.Replica); err != nil {
		return err
	}
	if err := sleepCtx(ctx, m.Ended); err != nil {
		return err
	}
	return e.announce(ctx, "NodeMaintenanceEnded", time.Now(), m.Replica)
}

// announce publishes one AzureRedisEvents message in Azure's format.
func (e *Env) announce(ctx context.Context, kind string, start time.Time, replica bool) error {
	at := ""
	if !start.IsZero() {
		at = start.UTC().Format("2006-01-02T15:04:05")
	}
	isReplica := "False"
	if replica {
		isReplica = "True"
	}
	_, port, _ := net.SplitHostPort(e.PrimaryAddr()) // the node under maintenance
	msg := "NotificationType|" + kind + "|StartTimeInUTC|" + at + "|IsReplica|" + isReplica +
		"|IPAddress|127.0.0.1|SSLPort|" + port + "|NonSSLPort|0"
	if _, err := e.Admin(ctx, "PUBLISH", EventsChannel, msg); err != nil {
		return fmt.Errorf("publish %s: %w", kind, err)
	}
	if e.logger != nil {
		e.logger.Info("maintenance announced", "type", kind)
	}
	return nil
}

// clientIDs returns the ids of the client connections open now, but the admin's.
func (e *Env) clientIDs(ctx context.Context) ([]string, error) {
	v, err := e.Admin(ctx, "CLIENT", "LIST")
	if err != nil {
		return nil, fmt.Errorf("CLIENT LIST: %w", err)
	}
	list, _ := v.(string)
	var ids []string
	for line := range strings.Lines(list) {
		var id, user string
		for f := range strings.FieldsSeq(line) {
			if v, ok := strings.CutPrefix(f, "id="); ok {
				id = v
			} else if v, ok := strings.CutPrefix(f, "user="); ok {
				user = v
			}
		}
		if id != "" && user != adminUser {
			ids = append(ids, id)
		}
	}
	return ids, nil
}
