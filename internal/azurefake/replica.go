package azurefake

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// A Standard or Premium cache is a primary and a replica behind Azure's load balancer; a maintenance fails
// the primary over to the replica. With Options.Replica the Env runs both (TLS, replication over TLS, every
// token's ACL user on both: ACL changes are not replicated), and RunFailover plays the failover, with a
// Relay as the load balancer.

// replicaSyncLimit bounds the wait for the replica to be in sync (at start, and before a failover).
const replicaSyncLimit = 10 * time.Second

// startReplicaLocked starts the replica of the server on e.port. The caller holds e.redisMu.
func (e *Env) startReplicaLocked(ctx context.Context) error {
	dir := e.path("replica")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("create %s: %w", dir, err)
	}
	var err error
	for range bindAttempts {
		port, perr := freePort()
		if perr != nil {
			return perr
		}
		n := &clusterNode{dir: dir, port: port, addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))}
		extra := fmt.Sprintf("replicaof 127.0.0.1 %d\ntls-replication yes\nmasteruser %s\nmasterauth %s\n",
			e.port, adminUser, strconv.Quote(e.adminPassword))
		if n.proc, err = e.launch(ctx, dir, port, extra); err == nil {
			n.admin = redis.NewClient(e.adminOptions(n.addr, 3))
			e.replica = n
			return awaitSync(ctx, e.admin, n.admin)
		}
		if !errors.Is(err, errExitedEarly) {
			break
		}
	}
	return fmt.Errorf("replica: %w", err)
}

// PrimaryAddr returns the address of the current primary: RedisAddr until a failover.
func (e *Env) PrimaryAddr() string {
	e.redisMu.Lock()
	defer e.redisMu.Unlock()
	if e.admin == nil {
		return e.RedisAddr // stopped
	}
	return e.admin.Options().Addr
}

// awaitSync waits until the replica's link is up and it has applied everything the primary sent.
func awaitSync(ctx context.Context, primary, replica *redis.Client) error {
	ctx, cancel := context.WithTimeout(ctx, replicaSyncLimit)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		p, perr := primary.Info(ctx, "replication").Result()
		r, rerr := replica.Info(ctx, "replication").Result()
		if err := errors.Join(perr, rerr); err == nil && infoField(r, "master_link_status") == "up" &&
			infoField(r, "slave_repl_offset") == infoField(p, "master_repl_offset") {
			return nil
		} else if ctx.Err() != nil {
			return fmt.Errorf("replica %s not in sync: %w (%v)", replica.Options().Addr, ctx.Err(), err)
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
		}
	}
}

// infoField returns a field of an INFO reply.
func infoField(info, name string) string {
	for line := range strings.Lines(info) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), name+":"); ok {
			return v
		}
	}
	return ""
}

// RunFailover fails the primary over to the replica, as a maintenance of the primary does: once the replica
// is in sync, it is promoted (REPLICAOF NO ONE) and the load balancer switched to it (switchLB), then the
// old primary's client connections are closed and it becomes the new primary's replica. Announced, the
// AzureRedisEvents announcements of m come around it (Start on the old primary, just after the switch,
// m.Close before the close: the proxy's control connection is still there); unannounced, nothing is
// published and the close comes with the switch.
// Clients must not write during it: a write that reaches the old primary after the sync is lost, as in a
// real failover.
func (e *Env) RunFailover(ctx context.Context, m Maintenance, announced bool, switchLB func(primary string)) error {
	publish := func(kind string, start time.Time) error {
		if !announced {
			return nil
		}
		return e.announce(ctx, kind, start, false)
	}
	startAt := time.Now().Add(m.Scheduled + m.Starting)
	if err := publish("NodeMaintenanceScheduled", startAt); err != nil {
		return err
	}
	if err := publish("NodeMaintenanceStarting", startAt); err != nil {
		return err
	}
	if err := sleepCtx(ctx, m.Starting); err != nil {
		return err
	}
	e.redisMu.Lock() // held only for the roles: minting a token takes it too
	primary, replica, newPrimary := e.admin, e.replica.admin, e.replica.addr
	e.redisMu.Unlock()
	err := awaitSync(ctx, primary, replica)
	if err == nil {
		err = replica.Do(ctx, "REPLICAOF", "NO", "ONE").Err()
	}
	if err != nil {
		return fmt.Errorf("promote the replica: %w", err)
	}
	switchLB(newPrimary)
	if announced { // unannounced, the close comes with the switch, as at a crash
		if err := publish("NodeMaintenanceStart", time.Time{}); err != nil {
			return err
		}
		if err := sleepCtx(ctx, m.Close); err != nil {
			return err
		}
	}
	doomed, err := e.clientIDs(ctx)
	if err != nil {
		return err
	}
	for _, id := range doomed {
		if _, err := e.Admin(ctx, "CLIENT", "KILL", "ID", id); err != nil && !strings.Contains(err.Error(), "No such client") {
			return fmt.Errorf("close connection %s: %w", id, err)
		}
	}
	_, port, _ := net.SplitHostPort(newPrimary)
	for _, args := range [][]any{{"CONFIG", "SET", "masteruser", adminUser}, {"CONFIG", "SET", "masterauth", e.adminPassword},
		{"CONFIG", "SET", "tls-replication", "yes"}, {"REPLICAOF", "127.0.0.1", port}} {
		if err == nil {
			err = primary.Do(ctx, args...).Err()
		}
	}
	if err == nil {
		e.redisMu.Lock()
		old := &clusterNode{dir: e.Dir, port: e.port, addr: primary.Options().Addr, proc: e.proc, admin: primary}
		n := e.replica
		e.proc, e.admin, e.port, e.replica = n.proc, n.admin, n.port, old
		e.redisMu.Unlock()
		err = awaitSync(ctx, replica, primary)
	}
	if err != nil {
		return fmt.Errorf("make the old primary a replica: %w", err)
	}
	if err := sleepCtx(ctx, m.Failover); err != nil {
		return err
	}
	if err := publish("NodeMaintenanceFailoverComplete", time.Time{}); err != nil {
		return err
	}
	if err := sleepCtx(ctx, m.Ended); err != nil {
		return err
	}
	return publish("NodeMaintenanceEnded", time.Now())
}

// sleepCtx waits d, or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
