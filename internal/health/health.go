// Package health provides the proxy's HTTP health endpoints, with the semantics of the
// Cloud SQL Auth Proxy v2 so that operators' probes and habits carry over:
//
//   - /startup is 200 once the proxy has started (listening and holding a token), 503 before;
//   - /liveness is 200 whenever the process serves HTTP;
//   - /readiness is 503 while starting, after shutdown began, when no valid token is held,
//     at the connection limit, or when a cache's last dial failed (SetUnreachable), and 200 otherwise;
//   - POST /quitquitquit starts the same shutdown as SIGTERM. RegisterQuit serves it, on its own mux:
//     the proxy keeps it on a loopback-only admin listener, apart from the probes the kubelet reaches.
//
// Every response is a short plain-text body saying why.
package health

import (
	"net/http"
	"sync"
	"sync/atomic"
)

// Paths served by Register.
const (
	StartupPath   = "/startup"
	LivenessPath  = "/liveness"
	ReadinessPath = "/readiness"
	QuitPath      = "/quitquitquit"
)

// Check holds the state the endpoints report. Its methods are safe for concurrent use.
type Check struct {
	started    atomic.Bool
	stopping   atomic.Bool
	tokenValid func() bool
	atLimit    func() bool
	// unreachable returns why a cache cannot be reached now, nil when every one can; set before serving.
	unreachable func() error
}

// New returns a Check in the starting state. tokenValid reports whether the proxy holds a
// token Azure still accepts; atLimit reports whether the client connection limit is reached.
// Both are called on every /readiness request, so they must be cheap; nil means "valid"
// and "not at the limit".
func New(tokenValid, atLimit func() bool) *Check {
	if tokenValid == nil {
		tokenValid = func() bool { return true }
	}
	if atLimit == nil {
		atLimit = func() bool { return false }
	}
	return &Check{tokenValid: tokenValid, atLimit: atLimit, unreachable: func() error { return nil }}
}

// SetUnreachable makes readiness 503 while f returns an error (a cache the proxy cannot reach now);
// f is called on every /readiness request and must be cheap. Call it before Register.
func (c *Check) SetUnreachable(f func() error) { c.unreachable = f }

// NotifyStarted marks the proxy as started: call it once the client listener is open and
// the first token has been fetched.
func (c *Check) NotifyStarted() { c.started.Store(true) }

// NotifyStopping marks the proxy as shutting down (after SIGTERM or /quitquitquit), so
// readiness turns 503 for good.
func (c *Check) NotifyStopping() { c.stopping.Store(true) }

// Register adds the probe endpoints (startup, liveness, readiness) to mux.
func (c *Check) Register(mux *http.ServeMux) {
	// "GET /x" patterns also match HEAD; other methods get 405 from the mux.
	mux.HandleFunc("GET "+StartupPath, c.startup)
	mux.HandleFunc("GET "+LivenessPath, func(w http.ResponseWriter, _ *http.Request) {
		reply(w, http.StatusOK, "ok")
	})
	mux.HandleFunc("GET "+ReadinessPath, c.readiness)
}

// RegisterQuit adds POST QuitPath to mux: the first POST calls quit, later ones are answered
// without calling it again.
func RegisterQuit(mux *http.ServeMux, quit func()) {
	var once sync.Once
	mux.HandleFunc("POST "+QuitPath, func(w http.ResponseWriter, _ *http.Request) {
		once.Do(quit)
		reply(w, http.StatusOK, "shutting down")
	})
}

func (c *Check) startup(w http.ResponseWriter, _ *http.Request) {
	if !c.started.Load() {
		reply(w, http.StatusServiceUnavailable, "starting")
		return
	}
	reply(w, http.StatusOK, "ok")
}

func (c *Check) readiness(w http.ResponseWriter, _ *http.Request) {
	switch {
	case c.stopping.Load():
		reply(w, http.StatusServiceUnavailable, "shutting down")
	case !c.started.Load():
		reply(w, http.StatusServiceUnavailable, "starting")
	case !c.tokenValid():
		reply(w, http.StatusServiceUnavailable, "no valid Entra token: the last token expired and no new one could be fetched")
	case c.atLimit():
		reply(w, http.StatusServiceUnavailable, "at the client connection limit (the proxy's start log says which limit and how to raise it)")
	default:
		if err := c.unreachable(); err != nil {
			reply(w, http.StatusServiceUnavailable, "a cache is unreachable: "+err.Error())
			return
		}
		reply(w, http.StatusOK, "ok")
	}
}

func reply(w http.ResponseWriter, code int, body string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = w.Write([]byte(body + "\n"))
}
