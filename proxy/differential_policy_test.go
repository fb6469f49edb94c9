package proxy_test

import (
	"fmt"
	"os"
	"strconv"
	"testing"
)

// The differential test under what Azure takes away (issue 10): data access policies that deny commands
// (NOPERM) and servers that lack some (Redis Enterprise: RESET, CLIENT REPLY, SELECT). The direct side runs
// as the same token user as the proxy, under the same policy, so every refusal is part of the reference.
// PROXY_DIFF_POLICY_SEEDS=N runs seeds 1..N per policy instead of the default four.
func TestDifferentialPolicies(t *testing.T) {
	v := serverVersion(t)
	type policy struct {
		name    string
		rules   []string
		renames map[string]string
	}
	enterprise := policy{name: "Enterprise command set", rules: []string{"-select", "-client|reply"}}
	switch {
	case !v.AtLeast(6, 2):
		enterprise.rules = []string{"-select"} // no subcommand rules on 6.0 (and no RESET anyway)
	default:
		enterprise.renames = map[string]string{"RESET": ""}
	}
	policies := []policy{
		// Azure's built-in Data Contributor is +@all -@dangerous (and a few cluster commands): CLIENT UNBLOCK
		// is @dangerous, so a command blocked across a token's expiry goes on leases (rescue.go).
		{name: "Data Contributor", rules: []string{"-@dangerous"}},
		// Data Reader: +@read +@connection.
		{name: "Data Reader", rules: []string{"-@all", "+@read", "+@connection"}},
		{name: "no transactions, pub/sub or MONITOR", rules: []string{"-@pubsub", "-multi", "-exec", "-discard", "-watch", "-monitor"}},
		enterprise,
	}
	seeds := []uint64{1, 2, 3, 4}
	if s := os.Getenv("PROXY_DIFF_POLICY_SEEDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("PROXY_DIFF_POLICY_SEEDS=%q: want a positive count", s)
		}
		seeds = seeds[:0]
		for i := range n {
			seeds = append(seeds, uint64(i+1))
		}
	}
	for _, p := range policies {
		t.Run(p.name, func(t *testing.T) {
			f := newFixture(t, fixtureOpts{lifetime: diffLifetime, userRules: p.rules, renames: p.renames})
			d := diffDialectFor(f.env.Version())
			// Without RESET the sequence's "RESET; AUTH" leaves a subscriber subscribed, where redis refuses
			// the client's AUTH and the proxy answers it itself (README: what is not exact).
			if _, renamed := p.renames["RESET"]; renamed {
				d.reset = false
			}
			t.Run("seeds", func(t *testing.T) {
				for _, seed := range seeds {
					t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
						t.Parallel()
						runDiffSeedIn(t, f, seed, d)
					})
				}
			})
		})
	}
}
