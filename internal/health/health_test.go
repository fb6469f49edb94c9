package health

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
)

func TestEndpoints(t *testing.T) {
	type state struct {
		started, stopping, tokenInvalid, atLimit bool
	}
	tcs := []struct {
		desc     string
		state    state
		method   string
		path     string
		wantCode int
		wantBody string // a substring of the body
	}{
		{"startup before start", state{}, "GET", StartupPath, 503, "starting"},
		{"startup after start", state{started: true}, "GET", StartupPath, 200, "ok"},
		{"startup stays 200 when stopping", state{started: true, stopping: true}, "GET", StartupPath, 200, "ok"},
		{"startup HEAD", state{started: true}, "HEAD", StartupPath, 200, ""},
		{"liveness before start", state{}, "GET", LivenessPath, 200, "ok"},
		{"liveness with no token and at limit", state{started: true, tokenInvalid: true, atLimit: true}, "GET", LivenessPath, 200, "ok"},
		{"liveness when stopping", state{started: true, stopping: true}, "GET", LivenessPath, 200, "ok"},
		{"readiness before start", state{}, "GET", ReadinessPath, 503, "starting"},
		{"readiness started", state{started: true}, "GET", ReadinessPath, 200, "ok"},
		{"readiness stopping", state{started: true, stopping: true}, "GET", ReadinessPath, 503, "shutting down"},
		{"readiness stopping before start", state{stopping: true}, "GET", ReadinessPath, 503, "shutting down"},
		{"readiness token invalid", state{started: true, tokenInvalid: true}, "GET", ReadinessPath, 503, "no valid Entra token"},
		{"readiness at limit", state{started: true, atLimit: true}, "GET", ReadinessPath, 503, "connection limit"},
		{"readiness POST", state{started: true}, "POST", ReadinessPath, 405, ""},
		{"quit is not a probe endpoint", state{started: true}, "POST", QuitPath, 404, ""},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			var tokenInvalid, atLimit atomic.Bool
			tokenInvalid.Store(tc.state.tokenInvalid)
			atLimit.Store(tc.state.atLimit)
			c := New(func() bool { return !tokenInvalid.Load() }, atLimit.Load)
			if tc.state.started {
				c.NotifyStarted()
			}
			if tc.state.stopping {
				c.NotifyStopping()
			}
			mux := http.NewServeMux()
			c.Register(mux)
			code, body := do(t, mux, tc.method, tc.path)
			if code != tc.wantCode {
				t.Errorf("%s %s: status %d, want %d (body %q)", tc.method, tc.path, code, tc.wantCode, body)
			}
			if !strings.Contains(body, tc.wantBody) {
				t.Errorf("%s %s: body %q, want it to contain %q", tc.method, tc.path, body, tc.wantBody)
			}
		})
	}
}

// TestReadinessFollowsInputs checks that readiness reads its inputs on every request, so a
// token that expires or a connection limit that is reached shows without a notification.
func TestReadinessFollowsInputs(t *testing.T) {
	var tokenValid, atLimit atomic.Bool
	tokenValid.Store(true)
	c := New(tokenValid.Load, atLimit.Load)
	var unreachable atomic.Pointer[error]
	c.SetUnreachable(func() error {
		if p := unreachable.Load(); p != nil {
			return *p
		}
		return nil
	})
	dialErr := errors.New("b.example.net:6380: dial tcp: connection refused")
	mux := http.NewServeMux()
	c.Register(mux)
	steps := []struct {
		desc     string
		change   func()
		wantCode int
	}{
		{"starting", func() {}, 503},
		{"started", c.NotifyStarted, 200},
		{"token expired", func() { tokenValid.Store(false) }, 503},
		{"new token", func() { tokenValid.Store(true) }, 200},
		{"limit reached", func() { atLimit.Store(true) }, 503},
		{"below limit", func() { atLimit.Store(false) }, 200},
		{"a cache unreachable", func() { unreachable.Store(&dialErr) }, 503},
		{"reachable again", func() { unreachable.Store(nil) }, 200},
		{"stopping", c.NotifyStopping, 503},
	}
	for _, s := range steps {
		s.change()
		if code, body := do(t, mux, "GET", ReadinessPath); code != s.wantCode {
			t.Errorf("after %s: status %d, want %d (body %q)", s.desc, code, s.wantCode, body)
		}
	}
}

func TestNilInputs(t *testing.T) {
	c := New(nil, nil)
	c.NotifyStarted()
	mux := http.NewServeMux()
	c.Register(mux)
	if code, body := do(t, mux, "GET", ReadinessPath); code != 200 {
		t.Errorf("status %d, want 200 (body %q)", code, body)
	}
}

func TestQuit(t *testing.T) {
	var calls atomic.Int32
	mux := http.NewServeMux()
	RegisterQuit(mux, func() { calls.Add(1) })
	tcs := []struct {
		desc      string
		method    string
		wantCode  int
		wantCalls int32
	}{
		{"GET is refused", "GET", 405, 0},
		{"PUT is refused", "PUT", 405, 0},
		{"first POST quits", "POST", 200, 1},
		{"second POST does not call again", "POST", 200, 1},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			code, body := do(t, mux, tc.method, QuitPath)
			if code != tc.wantCode {
				t.Errorf("%s: status %d, want %d (body %q)", tc.method, code, tc.wantCode, body)
			}
			if n := calls.Load(); n != tc.wantCalls {
				t.Errorf("quit called %d times, want %d", n, tc.wantCalls)
			}
		})
	}
}

func TestContentType(t *testing.T) {
	c := New(nil, nil)
	mux := http.NewServeMux()
	c.Register(mux)
	for _, path := range []string{StartupPath, LivenessPath, ReadinessPath} {
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
		if ct := rec.Header().Get("Content-Type"); ct != "text/plain; charset=utf-8" {
			t.Errorf("%s: Content-Type %q, want text/plain", path, ct)
		}
	}
}

// do sends one request through a real HTTP server, as a probe would.
func do(t *testing.T, h http.Handler, method, path string) (int, string) {
	t.Helper()
	srv := httptest.NewServer(h)
	defer srv.Close()
	req, err := http.NewRequest(method, srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}
