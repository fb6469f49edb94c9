package azurefake

import (
	"context"

	"github.com/redis/go-redis/v9"
)

// Share makes other trust e's tokens, as several caches trust one Entra identity: every token e's
// identity endpoint mints from now on (and every unexpired one minted before) is also an ACL user
// on other's servers, deleted from them at its expiry. other's own identity endpoint is not used; its
// certificates are its own (a client trusts both CA files). A restart of other (StartRedis) does
// not re-create the shared users.
func (e *Env) Share(ctx context.Context, other *Env) error {
	e.redisMu.Lock()
	defer e.redisMu.Unlock()
	e.sharers = append(e.sharers, other)
	return e.registerLiveLocked(ctx)
}

// tokenAdmins returns the admin connections of every running server that takes e's tokens: e's own
// and those of the Envs it shares them with. The caller holds e.redisMu (the sharers' locks are taken
// here, after it: a sharer never takes e's).
func (e *Env) tokenAdmins() []*redis.Client {
	cs := e.admins()
	for _, o := range e.sharers {
		o.redisMu.Lock()
		cs = append(cs, o.admins()...)
		o.redisMu.Unlock()
	}
	return cs
}
