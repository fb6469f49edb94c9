package azurefake

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
)

const redisScope = "https://redis.azure.com/.default"

// respConn is a raw RESP2 connection, so tests see exactly what the server sends and when
// it closes.
type respConn struct {
	c *tls.Conn
	r *bufio.Reader
}

func dialTLS(addr string, cfg *tls.Config) (*respConn, error) {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: 5 * time.Second}, Config: cfg}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	return &respConn{c: c.(*tls.Conn), r: bufio.NewReader(c)}, nil
}

func mustDial(t *testing.T, e *Env) *respConn {
	t.Helper()
	c, err := dialTLS(e.RedisAddr, e.ClientTLSConfig())
	if err != nil {
		t.Fatalf("dial %s: %v", e.RedisAddr, err)
	}
	t.Cleanup(func() { c.c.Close() })
	return c
}

// do sends one command and returns its reply: the first line, plus the payload of a bulk string.
func (c *respConn) do(args ...string) (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if err := c.c.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return "", err
	}
	if _, err := io.WriteString(c.c, b.String()); err != nil {
		return "", err
	}
	line, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimSuffix(line, "\r\n")
	if n, err := strconv.Atoi(strings.TrimPrefix(line, "$")); strings.HasPrefix(line, "$") && err == nil && n >= 0 {
		body, err := c.r.ReadString('\n')
		return strings.TrimSuffix(body, "\r\n"), err
	}
	return line, nil
}

// waitClosed blocks until the server closes the connection or the deadline passes.
func (c *respConn) waitClosed(deadline time.Time) error {
	if err := c.c.SetReadDeadline(deadline); err != nil {
		return err
	}
	b, err := c.r.ReadByte()
	if err == nil {
		return fmt.Errorf("unexpected data %q instead of a close", b)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return fmt.Errorf("still open at the deadline: %w", err)
	}
	return nil // EOF or reset: closed by the server
}

// claims decodes a JWT's payload.
func claims(t *testing.T, token string) map[string]any {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d dot-separated parts, want 3", len(parts))
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatalf("payload is not base64url without padding: %v", err)
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		t.Fatalf("payload is not JSON: %v", err)
	}
	return m
}

func TestTokenLifecycle(t *testing.T) {
	const lifetime = 2 * time.Second
	e := StartT(t, Options{TokenLifetime: lifetime})
	t.Setenv("IDENTITY_ENDPOINT", e.IdentityEndpoint) // azidentity picks the source at construction
	t.Setenv("IDENTITY_HEADER", e.IdentityHeader)
	cred, err := azidentity.NewManagedIdentityCredential(nil)
	if err != nil {
		t.Fatal(err)
	}
	getToken := func() (string, time.Time, string) {
		tok, err := cred.GetToken(t.Context(), policy.TokenRequestOptions{Scopes: []string{redisScope}})
		if err != nil {
			t.Fatalf("GetToken: %v", err)
		}
		c := claims(t, tok.Token)
		oid, _ := c["oid"].(string)
		if c["aud"] != "https://redis.azure.com" || oid == "" {
			t.Fatalf("claims aud=%v oid=%v, want aud https://redis.azure.com and an oid", c["aud"], c["oid"])
		}
		if got := time.Until(tok.ExpiresOn); got > lifetime || got < lifetime-1500*time.Millisecond {
			t.Fatalf("ExpiresOn in %v, want about %v", got, lifetime)
		}
		return tok.Token, tok.ExpiresOn, oid
	}
	token, _, oid := getToken()
	if _, _, oid2 := getToken(); oid2 == oid {
		t.Fatalf("two tokens share oid %s; each must get a new one", oid)
	}
	issued := e.Tokens()
	if len(issued) != 2 || issued[0].OID != oid || issued[0].Token != token || issued[0].Seq != 1 || issued[0].Deleted {
		t.Fatalf("Tokens() = %+v, want 2 records, the first for oid %s", issued, oid)
	}

	c := mustDial(t, e)
	for _, step := range [][2]string{{"AUTH " + oid + " <token>", "+OK"}, {"ACL WHOAMI", oid}, {"SET k v", "+OK"}} {
		args := strings.Fields(step[0])
		if args[0] == "AUTH" {
			args[2] = token
		}
		if got, err := c.do(args...); err != nil || got != step[1] {
			t.Fatalf("%s: got %q, %v; want %q", step[0], got, err, step[1])
		}
	}

	// The server must close the authenticated connection once the token expires, not before.
	if err := c.waitClosed(issued[0].ExpiresOn.Add(5 * time.Second)); err != nil {
		t.Fatalf("connection authenticated with the expired token: %v", err)
	}
	if now := time.Now(); now.Before(issued[0].ExpiresOn) {
		t.Fatalf("connection closed %v before the token expired", issued[0].ExpiresOn.Sub(now))
	}
	waitFor(t, 5*time.Second, "token 1 to be marked Deleted", func() bool { return e.Tokens()[0].Deleted })
	if got, err := mustDial(t, e).do("AUTH", oid, token); err != nil || !strings.HasPrefix(got, "-WRONGPASS") {
		t.Fatalf("AUTH with an expired token: got %q, %v; want -WRONGPASS", got, err)
	}
	if s := e.Stats(); s.Minted != 2 || s.Requests != 2 || s.Faults != 0 {
		t.Fatalf("Stats() = %+v, want 2 requests, 2 minted", s)
	}
}

func TestUnauthenticatedGetsNOAUTH(t *testing.T) {
	e := StartT(t, Options{})
	c := mustDial(t, e)
	if got, err := c.do("PING"); err != nil || !strings.HasPrefix(got, "-NOAUTH") {
		t.Fatalf("PING without AUTH: got %q, %v; want -NOAUTH", got, err)
	}
	if got, err := c.do("AUTH", "default", "nopass"); err != nil || !strings.HasPrefix(got, "-WRONGPASS") {
		t.Fatalf("AUTH default: got %q, %v; want -WRONGPASS", got, err)
	}
	if got, err := e.Admin(t.Context(), "PING"); err != nil || got != "PONG" {
		t.Fatalf("Admin PING: %v, %v", got, err)
	}
}

// tokenRequest asks the identity endpoint for a token the way MSAL does.
func tokenRequest(ctx context.Context, e *Env, header string, query url.Values) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, e.IdentityEndpoint+"?"+query.Encode(), nil)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("X-IDENTITY-HEADER", header)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, body, err
}

func TestIdentityEndpoint(t *testing.T) {
	e := StartT(t, Options{})
	good := url.Values{"api-version": {appServiceAPIVersion}, "resource": {"https://redis.azure.com"}}
	tcs := []struct {
		desc       string
		fault      Fault
		header     string
		query      url.Values
		wantStatus int
		check      func(t *testing.T, body []byte)
	}{
		{desc: "token", header: e.IdentityHeader, query: good, wantStatus: 200, check: func(t *testing.T, body []byte) {
			var r map[string]string
			if err := json.Unmarshal(body, &r); err != nil {
				t.Fatalf("body %q: %v", body, err)
			}
			exp, err := strconv.ParseInt(r["expires_on"], 10, 64)
			if err != nil || time.Until(time.Unix(exp, 0)) < 59*time.Minute {
				t.Errorf("expires_on %q, want unix seconds about 1h ahead", r["expires_on"])
			}
			if r["token_type"] != "Bearer" || r["resource"] != "https://redis.azure.com" || r["access_token"] == "" {
				t.Errorf("response %v lacks token_type Bearer, resource or access_token", r)
			}
		}},
		{desc: "wrong header", header: "nope", query: good, wantStatus: 401},
		{desc: "no api-version", header: e.IdentityHeader, query: url.Values{"resource": {"r"}}, wantStatus: 400},
		{desc: "no resource", header: e.IdentityHeader, query: url.Values{"api-version": {appServiceAPIVersion}}, wantStatus: 400},
		{desc: "500", fault: FaultStatus500, header: e.IdentityHeader, query: good, wantStatus: 500, check: func(t *testing.T, body []byte) {
			var r map[string]any
			if err := json.Unmarshal(body, &r); err != nil || r["error"] != "server_error" {
				t.Errorf("body %q is not an Entra-style error (%v)", body, err)
			}
		}},
		{desc: "garbage", fault: FaultGarbage, header: e.IdentityHeader, query: good, wantStatus: 200, check: func(t *testing.T, body []byte) {
			if json.Valid(body) {
				t.Errorf("body %q is valid JSON", body)
			}
		}},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			e.SetFault(tc.fault)
			defer e.SetFault(FaultNone)
			status, body, err := tokenRequest(t.Context(), e, tc.header, tc.query)
			if err != nil {
				t.Fatal(err)
			}
			if status != tc.wantStatus {
				t.Fatalf("status %d, want %d (body %q)", status, tc.wantStatus, body)
			}
			if tc.check != nil {
				tc.check(t, body)
			}
		})
	}
	if s := e.Stats(); s != (Stats{Requests: 6, Rejected: 3, Faults: 2, Minted: 1}) {
		t.Errorf("Stats() = %+v", s)
	}

	t.Run("hang until the client gives up", func(t *testing.T) {
		e.SetFault(FaultHang)
		defer e.SetFault(FaultNone)
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		defer cancel()
		if _, _, err := tokenRequest(ctx, e, e.IdentityHeader, good); !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("got %v, want a deadline error", err)
		}
	})

	t.Run("fail every 3rd", func(t *testing.T) {
		e.SetFailEvery(3, FaultStatus500)
		defer e.SetFailEvery(0, FaultNone)
		var got []int
		for range 6 {
			status, _, err := tokenRequest(t.Context(), e, e.IdentityHeader, good)
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, status)
		}
		if fmt.Sprint(got) != "[200 200 500 200 200 500]" {
			t.Fatalf("statuses %v, want every 3rd to be 500", got)
		}
	})

	t.Run("azidentity reports garbage", func(t *testing.T) {
		t.Setenv("IDENTITY_ENDPOINT", e.IdentityEndpoint)
		t.Setenv("IDENTITY_HEADER", e.IdentityHeader)
		cred, err := azidentity.NewManagedIdentityCredential(nil)
		if err != nil {
			t.Fatal(err)
		}
		e.SetFault(FaultGarbage)
		defer e.SetFault(FaultNone)
		if _, err := cred.GetToken(t.Context(), policy.TokenRequestOptions{Scopes: []string{redisScope}}); err == nil {
			t.Fatal("GetToken succeeded on a non-JSON body")
		}
	})
}

func TestHangEndsOnClose(t *testing.T) {
	e, err := Start(t.Context(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	e.SetFault(FaultHang)
	done := make(chan int, 1)
	go func() {
		status, _, err := tokenRequest(context.Background(), e, e.IdentityHeader,
			url.Values{"api-version": {appServiceAPIVersion}, "resource": {"r"}})
		if err != nil {
			status = -1
		}
		done <- status
	}()
	waitFor(t, 5*time.Second, "the hanging request to arrive", func() bool { return e.Stats().Faults == 1 })
	if err := e.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case status := <-done:
		if status != http.StatusServiceUnavailable {
			t.Fatalf("hanging request ended with %d, want 503", status)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("hanging request still blocked after Close")
	}
	if _, err := os.Stat(e.Dir); !os.IsNotExist(err) {
		t.Fatalf("temporary dir %s not removed: %v", e.Dir, err)
	}
}

func TestRestartKeepsValidTokens(t *testing.T) {
	e := StartT(t, Options{})
	good := url.Values{"api-version": {appServiceAPIVersion}, "resource": {"https://redis.azure.com"}}
	mint := func() IssuedToken {
		if status, body, err := tokenRequest(t.Context(), e, e.IdentityHeader, good); err != nil || status != 200 {
			t.Fatalf("token request: %d %q %v", status, body, err)
		}
		all := e.Tokens()
		return all[len(all)-1]
	}
	before := mint()
	c := mustDial(t, e)
	if got, err := c.do("AUTH", before.OID, before.Token); got != "+OK" {
		t.Fatalf("AUTH: %q %v", got, err)
	}
	addr := e.RedisAddr
	if err := e.StopRedis(); err != nil {
		t.Fatal(err)
	}
	if err := c.waitClosed(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatalf("connection after StopRedis: %v", err)
	}
	if _, err := dialTLS(e.RedisAddr, e.ClientTLSConfig()); err == nil {
		t.Fatal("dial succeeded while redis is stopped")
	}
	if _, err := e.Admin(t.Context(), "PING"); err == nil {
		t.Fatal("Admin succeeded while redis is stopped")
	}
	during := mint() // Entra keeps issuing while the cache is down
	if err := e.StartRedis(t.Context()); err != nil {
		t.Fatal(err)
	}
	if e.RedisAddr != addr {
		t.Fatalf("address changed from %s to %s", addr, e.RedisAddr)
	}
	for _, tok := range []IssuedToken{before, during} {
		if got, err := mustDial(t, e).do("AUTH", tok.OID, tok.Token); got != "+OK" {
			t.Fatalf("AUTH token %d after restart: %q %v", tok.Seq, got, err)
		}
	}
	if got, err := e.Admin(t.Context(), "ACL", "WHOAMI"); err != nil || got != "admin" {
		t.Fatalf("Admin ACL WHOAMI after restart: %v %v", got, err)
	}
}

func TestTLS(t *testing.T) {
	e := StartT(t, Options{})
	expired := StartT(t, Options{ExpiredCert: true})
	untrusted := x509.NewCertPool()
	pemBytes, err := os.ReadFile(e.UntrustedCAFile())
	if err != nil || !untrusted.AppendCertsFromPEM(pemBytes) {
		t.Fatalf("read %s: %v", e.UntrustedCAFile(), err)
	}
	with := func(f func(*tls.Config)) *tls.Config {
		c := e.ClientTLSConfig()
		f(c)
		return c
	}
	tcs := []struct {
		desc    string
		env     *Env
		cfg     *tls.Config
		wantErr func(error) bool // nil: the handshake must succeed
	}{
		{"server name", e, e.ClientTLSConfig(), nil},
		{"localhost", e, with(func(c *tls.Config) { c.ServerName = "localhost" }), nil},
		{"IP address", e, with(func(c *tls.Config) { c.ServerName = "" }), nil},
		{"other name", e, with(func(c *tls.Config) { c.ServerName = "other.redis.cache.windows.net" }), func(err error) bool {
			var h x509.HostnameError
			return errors.As(err, &h)
		}},
		{"untrusted CA", e, with(func(c *tls.Config) { c.RootCAs = untrusted }), func(err error) bool {
			var u x509.UnknownAuthorityError
			return errors.As(err, &u)
		}},
		{"expired certificate", expired, expired.ClientTLSConfig(), func(err error) bool {
			var c x509.CertificateInvalidError
			return errors.As(err, &c) && c.Reason == x509.Expired
		}},
		{"TLS 1.1", e, with(func(c *tls.Config) { c.MinVersion, c.MaxVersion = tls.VersionTLS10, tls.VersionTLS11 }), func(err error) bool {
			return err != nil
		}},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			c, err := dialTLS(tc.env.RedisAddr, tc.cfg)
			if err == nil {
				c.c.Close()
			}
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("handshake failed: %v", err)
			case tc.wantErr != nil && !tc.wantErr(err):
				t.Fatalf("handshake error %v is not the expected kind", err)
			}
		})
	}
}

func TestProxyEnv(t *testing.T) {
	e := StartT(t, Options{ServerName: "mycache.redis.cache.windows.net"})
	got := map[string]string{}
	for _, kv := range e.ProxyEnv() {
		k, v, _ := strings.Cut(kv, "=")
		got[k] = v
	}
	want := map[string]string{
		"ENTRA_REDIS_PROXY_UPSTREAM":        e.RedisAddr,
		"ENTRA_REDIS_PROXY_TLS_CA_FILE":     e.CAFile,
		"ENTRA_REDIS_PROXY_TLS_SERVER_NAME": "mycache.redis.cache.windows.net",
		"ENTRA_REDIS_PROXY_CREDENTIAL":      "managed-identity",
		"IDENTITY_ENDPOINT":                 e.IdentityEndpoint,
		"IDENTITY_HEADER":                   e.IdentityHeader,
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("ProxyEnv() = %v, want %v", got, want)
	}
}

// waitFor polls cond until it holds or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(d)
	for !cond() {
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
	}
}

// tokenConn mints a token through the identity endpoint and returns a connection authenticated with it.
func tokenConn(t *testing.T, e *Env) *respConn {
	t.Helper()
	oid, token := mintToken(t, e)
	c := mustDial(t, e)
	if got, err := c.do("AUTH", oid, token); err != nil || got != "+OK" {
		t.Fatalf("AUTH as the token's user: %q, %v", got, err)
	}
	return c
}

func TestParseVersion(t *testing.T) {
	for in, want := range map[string]Version{
		"Redis server v=6.0.20 sha=00000000:0 malloc=libc bits=64 build=b5f691652ff47944\n":        {6, 0, 20},
		"Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d7c971a948f0": {7, 0, 15},
	} {
		if got, err := parseVersion(in); err != nil || got != want {
			t.Errorf("parseVersion(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "Redis server v=7.x", "KeyDB v=6"} {
		if got, err := parseVersion(in); err == nil {
			t.Errorf("parseVersion(%q) = %v, want an error", in, got)
		}
	}
	v := Version{6, 2, 0}
	for _, c := range []struct {
		major, minor int
		want         bool
	}{{6, 0, true}, {6, 2, true}, {6, 3, false}, {7, 0, false}, {5, 9, true}} {
		if got := v.AtLeast(c.major, c.minor); got != c.want {
			t.Errorf("%v.AtLeast(%d, %d) = %v, want %v", v, c.major, c.minor, got, c.want)
		}
	}
}

// The Env runs the version it reports, and its token users may use every pub/sub channel on it
// (through "&*" from 6.2 on; 6.0 has no channel rules).
func TestVersionAndChannels(t *testing.T) {
	e := StartT(t, Options{})
	want, err := ServerVersion(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if e.Version() != want || want.Major < 6 {
		t.Fatalf("Version() = %v, redis-server --version says %v", e.Version(), want)
	}
	info, err := e.Admin(t.Context(), "INFO", "server")
	if s, _ := info.(string); err != nil || !strings.Contains(s, "redis_version:"+want.String()+"\r\n") {
		t.Fatalf("INFO server = %q, %v; want redis_version:%v", info, err, want)
	}
	sub := tokenConn(t, e)
	if got, err := sub.do("SUBSCRIBE", "news"); err != nil || got != "*3" {
		t.Fatalf("SUBSCRIBE news as a token user: %q, %v", got, err)
	}
	if got, err := tokenConn(t, e).do("PUBLISH", "news", "hi"); err != nil || got != ":1" {
		t.Fatalf("PUBLISH news as a token user: %q, %v; want :1 (the subscriber)", got, err)
	}
}

func TestRenameCommands(t *testing.T) {
	renames := map[string]string{"FLUSHALL": "", "echo": "SAY"}
	v, err := ServerVersion(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if v.AtLeast(6, 2) { // 6.0 has no RESET: renaming it would be refused at startup
		renames["RESET"] = ""
	}
	e := StartT(t, Options{RenameCommands: renames})
	c := tokenConn(t, e)
	for _, step := range [][2]string{
		{"FLUSHALL", "-ERR unknown command"},
		{"ECHO hi", "-ERR unknown command"},
		{"SAY hi", "hi"},
		{"RESET", "-ERR unknown command"}, // taken away, or never there
		{"PING", "+PONG"},
	} {
		if got, err := c.do(strings.Fields(step[0])...); err != nil || !strings.HasPrefix(got, step[1]) {
			t.Fatalf("%s: got %q, %v; want %q", step[0], got, err, step[1])
		}
	}
	if got, err := e.Admin(t.Context(), "ACL", "WHOAMI"); err != nil || got != "admin" {
		t.Fatalf("admin after renames: %v, %v", got, err)
	}

	for _, bad := range []map[string]string{{"acl": "X"}, {"AUTH": ""}, {"GET": "G T"}, {"": "X"}, {"GET": `"`}} {
		if e, err := Start(t.Context(), Options{RenameCommands: bad}); err == nil {
			e.Close()
			t.Errorf("Start with RenameCommands %q succeeded, want an error", bad)
		}
	}
	if e, err := Start(t.Context(), Options{RenameCommands: map[string]string{"NOSUCHCMD": ""}}); err == nil {
		e.Close()
		t.Errorf("Start renaming a command the server lacks succeeded, want redis-server's refusal")
	} else if !strings.Contains(err.Error(), "No such command in rename-command") {
		t.Errorf("Start renaming NOSUCHCMD: %v, want redis-server's reason", err)
	}
}
