package azurefake

import "context"

// TB is the part of testing.TB that StartT uses (*testing.T and *testing.B have it), so that
// this package, which the fakeazure command also links, does not import testing.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
	Errorf(format string, args ...any)
	Cleanup(func())
	Context() context.Context
}

// StartT starts an Env for a test and closes it in t.Cleanup. It fails the test, never skips
// it, when the Env cannot start; the message says how to install a missing redis-server.
func StartT(t TB, opts Options) *Env {
	t.Helper()
	e, err := Start(t.Context(), opts)
	if err != nil {
		t.Fatalf("azurefake: %v", err)
	}
	t.Cleanup(func() {
		if err := e.Close(); err != nil {
			t.Errorf("azurefake: close: %v", err)
		}
	})
	return e
}
