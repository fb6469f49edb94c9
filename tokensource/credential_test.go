package tokensource

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
)

// appServiceMI imitates the App Service managed identity endpoint that MSAL calls when IDENTITY_ENDPOINT
// and IDENTITY_HEADER are set (createAppServiceAuthRequest in MSAL's managedidentity package):
// GET ?api-version=2019-08-01&resource=<scope without /.default> with header X-IDENTITY-HEADER.
type appServiceMI struct {
	t        *testing.T
	header   string
	resource string
	lifetime time.Duration

	mu       sync.Mutex
	requests int
}

func (m *appServiceMI) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	switch {
	case r.Header.Get("X-IDENTITY-HEADER") != m.header:
		http.Error(w, `{"error":"unauthorized","error_description":"bad X-IDENTITY-HEADER"}`, http.StatusUnauthorized)
		m.t.Errorf("X-IDENTITY-HEADER %q", r.Header.Get("X-IDENTITY-HEADER"))
		return
	case q.Get("api-version") != "2019-08-01" || q.Get("resource") != m.resource || r.Method != http.MethodGet:
		http.Error(w, `{"error":"invalid_request"}`, http.StatusBadRequest)
		m.t.Errorf("unexpected request %s %s", r.Method, r.URL)
		return
	}
	m.mu.Lock()
	m.requests++
	n := m.requests
	m.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"access_token":%q,"expires_on":"%d","resource":%q,"token_type":"Bearer"}`,
		jwt(m.t, map[string]any{"oid": testOID, "n": n}), time.Now().Add(m.lifetime).Unix(), m.resource)
}

func (m *appServiceMI) count() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.requests
}

func startAppServiceMI(t *testing.T, resource string, lifetime time.Duration) *appServiceMI {
	m := &appServiceMI{t: t, header: "secret-header-value", resource: resource, lifetime: lifetime}
	srv := httptest.NewServer(m)
	t.Cleanup(srv.Close)
	t.Setenv("IDENTITY_ENDPOINT", srv.URL)
	t.Setenv("IDENTITY_HEADER", m.header)
	for _, v := range []string{"AZURE_CLIENT_ID", "MSI_ENDPOINT", "MSI_SECRET", "IMDS_ENDPOINT", "IDENTITY_SERVER_THUMBPRINT"} {
		t.Setenv(v, "")
	}
	return m
}

// The real ManagedIdentityCredential against an App Service endpoint issuing tokens that live 3 seconds
// or less (expires_on has whole seconds): the Source must get a new token per rotation.
func TestManagedIdentityRotatesRealTokens(t *testing.T) {
	const resource = "https://redis.azure.com"
	m := startAppServiceMI(t, resource, 3*time.Second)
	newCred := func() (azcore.TokenCredential, error) { return NewCredential(KindManagedIdentity, "", "") }
	s, err := New(newCred, Options{Scope: resource + "/.default", Logger: discardLogger(), RequestTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	toks, times := collect(t, s, 4, 10*time.Second)
	for i, tok := range toks {
		if tok.Username != testOID {
			t.Errorf("token %d: username %q", i, tok.Username)
		}
		if i == 0 {
			continue
		}
		if tok.Secret == toks[i-1].Secret {
			t.Errorf("token %d repeats token %d", i, i-1)
		}
		// A new token must be in hand well before the previous one expires.
		if left := toks[i-1].ExpiresOn.Sub(times[i]); left < 500*time.Millisecond {
			t.Errorf("token %d arrived %v before the previous one expired", i, left)
		}
	}
	if n := m.count(); n != 4 {
		t.Errorf("%d requests to the endpoint for 4 tokens", n)
	}
	t.Logf("4 tokens in %v", time.Since(start).Round(time.Millisecond))
}

// MSAL keeps managed identity tokens in one cache per process and hands a cached token back until 5
// minutes before it expires; the credential of NewCredential skips that cache when asked.
func TestManagedIdentityCacheBypass(t *testing.T) {
	// A cache entry of its own, also when the test runs again in this process (-count).
	resource := fmt.Sprintf("https://bypass-%d.example.com", time.Now().UnixNano())
	m := startAppServiceMI(t, resource, time.Hour)
	ctx := context.Background()
	opts := policy.TokenRequestOptions{Scopes: []string{resource + "/.default"}}
	get := func(ctx context.Context) string {
		t.Helper()
		cred, err := NewCredential(KindManagedIdentity, "", "") // a new credential every time
		if err != nil {
			t.Fatal(err)
		}
		tok, err := cred.GetToken(ctx, opts)
		if err != nil {
			t.Fatal(err)
		}
		return tok.Token
	}
	first := get(ctx)
	if again := get(ctx); again != first || m.count() != 1 {
		t.Fatalf("a new credential did not get the cached token (requests %d): is MSAL's cache still process-wide?", m.count())
	}
	fresh := get(withBypassCache(ctx))
	if fresh == first || m.count() != 2 {
		t.Fatalf("bypass did not reach the endpoint (requests %d)", m.count())
	}
	if again := get(ctx); again != fresh {
		t.Error("the token got by bypassing the cache did not replace the cached one")
	}
}

func TestNewCredential(t *testing.T) {
	cert := writeTestCert(t)
	tcs := []struct {
		desc      string
		kind      string
		clientID  string
		resID     string
		env       map[string]string
		wantErr   string // empty: success
		wantEnvID string // AZURE_CLIENT_ID afterwards, if set
	}{
		{"unknown kind", "magic", "", "", nil, "unknown kind", ""},
		{"both IDs", KindManagedIdentity, "c", "r", nil, "not both", ""},
		{"resource ID needs managed-identity", KindDefault, "", "r", nil, "managed-identity", ""},
		{"client-secret without variables", KindClientSecret, "", "", nil, "AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_CLIENT_SECRET", ""},
		{"client-secret without secret", KindClientSecret, "", "", map[string]string{"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c"}, "set AZURE_CLIENT_SECRET", ""},
		{"client-secret", KindClientSecret, "", "", map[string]string{"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s"}, "", ""},
		{"client-certificate without path", KindClientCertificate, "", "", map[string]string{"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c"}, "set AZURE_CLIENT_CERTIFICATE_PATH", ""},
		{"client-certificate unreadable", KindClientCertificate, "", "", map[string]string{"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_CERTIFICATE_PATH": "/nonexistent.pem"}, "AZURE_CLIENT_CERTIFICATE_PATH", ""},
		{"client-certificate", KindClientCertificate, "", "", map[string]string{"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_CERTIFICATE_PATH": cert}, "", ""},
		{"workload-identity without token file", KindWorkloadIdentity, "", "", map[string]string{"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c"}, "set AZURE_FEDERATED_TOKEN_FILE", ""},
		{"workload-identity", KindWorkloadIdentity, "", "", map[string]string{"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_FEDERATED_TOKEN_FILE": cert}, "", ""},
		{"azure-cli", KindAzureCLI, "", "", nil, "", ""},
		{"managed-identity by client ID", KindManagedIdentity, "c", "", nil, "", ""},
		{"managed-identity by resource ID", KindManagedIdentity, "", "/subscriptions/x/resourceGroups/y/providers/Microsoft.ManagedIdentity/userAssignedIdentities/z", nil, "", ""},
		{"default", KindDefault, "", "", nil, "", ""},
		{"default picks the managed identity", KindDefault, "mi-client", "", nil, "", "mi-client"},
		{"default with the same AZURE_CLIENT_ID", KindDefault, "mi-client", "", map[string]string{"AZURE_CLIENT_ID": "mi-client"}, "", "mi-client"},
		{"default with another AZURE_CLIENT_ID", KindDefault, "mi-client", "", map[string]string{"AZURE_CLIENT_ID": "other"}, "differ", ""},
	}
	for _, tc := range tcs {
		t.Run(tc.desc, func(t *testing.T) {
			for _, v := range []string{"AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
				"AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_TOKEN_CREDENTIALS"} {
				t.Setenv(v, tc.env[v]) // restores the variable after the test
				if tc.env[v] == "" {
					os.Unsetenv(v) // azidentity tells unset from empty
				}
			}
			cred, err := NewCredential(tc.kind, tc.clientID, tc.resID)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || cred == nil {
				t.Fatalf("NewCredential: %v", err)
			}
			if tc.wantEnvID != "" && os.Getenv("AZURE_CLIENT_ID") != tc.wantEnvID {
				t.Errorf("AZURE_CLIENT_ID %q, want %q", os.Getenv("AZURE_CLIENT_ID"), tc.wantEnvID)
			}
		})
	}
}

// writeTestCert writes a self-signed certificate and its key as PEM and returns the file's path.
func writeTestCert(t *testing.T) string {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048) // azidentity takes RSA keys only
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	data := append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})...)
	path := filepath.Join(t.TempDir(), "cert.pem")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
