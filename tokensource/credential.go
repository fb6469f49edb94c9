package tokensource

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
)

// Credential kinds accepted by NewCredential.
const (
	KindDefault           = "default"
	KindManagedIdentity   = "managed-identity"
	KindWorkloadIdentity  = "workload-identity"
	KindAzureCLI          = "azure-cli"
	KindClientSecret      = "client-secret"
	KindClientCertificate = "client-certificate"
)

// NewCredential builds the credential for a configured kind:
//
//   - "default": azidentity.DefaultAzureCredential (environment, workload identity, managed identity, Azure
//     CLI, ...). A non-empty miClientID selects that user-assigned managed identity: DefaultAzureCredential
//     reads it only from AZURE_CLIENT_ID, so NewCredential sets AZURE_CLIENT_ID when it is unset and fails
//     when it holds a different ID.
//   - "managed-identity": azidentity.ManagedIdentityCredential, user-assigned by miClientID or by
//     miResourceID (not both), else by AZURE_CLIENT_ID as DefaultAzureCredential does, else system-assigned.
//   - "workload-identity": azidentity.WorkloadIdentityCredential (AZURE_CLIENT_ID, AZURE_TENANT_ID,
//     AZURE_FEDERATED_TOKEN_FILE, set by the AKS workload identity webhook).
//   - "azure-cli": azidentity.AzureCLICredential (the user logged in with `az login`).
//   - "client-secret": azidentity.ClientSecretCredential from AZURE_TENANT_ID, AZURE_CLIENT_ID and
//     AZURE_CLIENT_SECRET.
//   - "client-certificate": azidentity.ClientCertificateCredential from AZURE_TENANT_ID, AZURE_CLIENT_ID,
//     AZURE_CLIENT_CERTIFICATE_PATH (PEM or PKCS#12 with the private key), optional
//     AZURE_CLIENT_CERTIFICATE_PASSWORD and AZURE_CLIENT_SEND_CERTIFICATE_CHAIN.
//
// azidentity's other AZURE_* variables (AZURE_AUTHORITY_HOST, AZURE_TOKEN_CREDENTIALS, ...) keep working.
// Errors name the variables that are missing.
//
// Each call returns a credential with its own empty in-memory token cache, except that MSAL keeps
// managed identity tokens in one cache per process; the credential returned for "managed-identity"
// therefore skips that cache when the Source asks for a fresh token (see the package comment).
func NewCredential(kind, miClientID, miResourceID string) (azcore.TokenCredential, error) {
	if miClientID != "" && miResourceID != "" {
		return nil, errors.New("credential: set a managed identity client ID or resource ID, not both")
	}
	if miResourceID != "" && kind != KindManagedIdentity {
		return nil, fmt.Errorf("credential %s: a managed identity resource ID needs the %s credential", kind, KindManagedIdentity)
	}
	var (
		cred azcore.TokenCredential
		err  error
	)
	switch kind {
	case KindDefault:
		if err := selectDefaultIdentity(miClientID); err != nil {
			return nil, err
		}
		cred, err = azidentity.NewDefaultAzureCredential(nil)
	case KindManagedIdentity:
		// azidentity retries a managed identity endpoint's 5xx itself, for up to about 80 s (6 tries, 2 s
		// doubling), inside one GetToken: the Source's request timeout then cuts it, and its error says
		// "no answer" instead of the endpoint's. The Source retries (every second during an outage), so one
		// GetToken makes one request and reports what the endpoint said.
		o := azidentity.ManagedIdentityCredentialOptions{ClientOptions: azcore.ClientOptions{Retry: policy.RetryOptions{MaxRetries: -1}}}
		switch {
		case miClientID != "":
			o.ID = azidentity.ClientID(miClientID)
		case miResourceID != "":
			o.ID = azidentity.ResourceID(miResourceID)
		case os.Getenv("AZURE_CLIENT_ID") != "":
			o.ID = azidentity.ClientID(os.Getenv("AZURE_CLIENT_ID"))
		}
		var mi *azidentity.ManagedIdentityCredential
		if mi, err = azidentity.NewManagedIdentityCredential(&o); err == nil {
			cred = managedIdentity{mi}
		}
	case KindWorkloadIdentity:
		if err := requireEnv(kind, "AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_FEDERATED_TOKEN_FILE"); err != nil {
			return nil, err
		}
		cred, err = azidentity.NewWorkloadIdentityCredential(nil)
	case KindAzureCLI:
		cred, err = azidentity.NewAzureCLICredential(nil)
	case KindClientSecret:
		if err := requireEnv(kind, "AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET"); err != nil {
			return nil, err
		}
		cred, err = azidentity.NewClientSecretCredential(os.Getenv("AZURE_TENANT_ID"), os.Getenv("AZURE_CLIENT_ID"),
			os.Getenv("AZURE_CLIENT_SECRET"), nil)
	case KindClientCertificate:
		cred, err = newCertificateCredential()
	default:
		return nil, fmt.Errorf("credential %q: unknown kind; use one of %s, %s, %s, %s, %s, %s", kind, KindDefault,
			KindManagedIdentity, KindWorkloadIdentity, KindAzureCLI, KindClientSecret, KindClientCertificate)
	}
	if err != nil {
		return nil, fmt.Errorf("credential %s: %w", kind, err)
	}
	return cred, nil
}

// selectDefaultIdentity points DefaultAzureCredential at a user-assigned managed identity, which it
// takes only from AZURE_CLIENT_ID.
func selectDefaultIdentity(miClientID string) error {
	if miClientID == "" {
		return nil
	}
	switch env := os.Getenv("AZURE_CLIENT_ID"); env {
	case "":
		return os.Setenv("AZURE_CLIENT_ID", miClientID)
	case miClientID:
		return nil
	default:
		return fmt.Errorf("credential %s: AZURE_CLIENT_ID (%s) and the managed identity client ID (%s) differ; "+
			"DefaultAzureCredential uses AZURE_CLIENT_ID for both, so set only one", KindDefault, env, miClientID)
	}
}

// requireEnv fails naming every variable of names that is empty.
func requireEnv(kind string, names ...string) error {
	var missing []string
	for _, n := range names {
		if os.Getenv(n) == "" {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("credential %s: set %s", kind, strings.Join(missing, ", "))
	}
	return nil
}

func newCertificateCredential() (azcore.TokenCredential, error) {
	if err := requireEnv(KindClientCertificate, "AZURE_TENANT_ID", "AZURE_CLIENT_ID", "AZURE_CLIENT_CERTIFICATE_PATH"); err != nil {
		return nil, err
	}
	path := os.Getenv("AZURE_CLIENT_CERTIFICATE_PATH")
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("AZURE_CLIENT_CERTIFICATE_PATH: %w", err)
	}
	var password []byte
	if p := os.Getenv("AZURE_CLIENT_CERTIFICATE_PASSWORD"); p != "" {
		password = []byte(p)
	}
	certs, key, err := azidentity.ParseCertificates(data, password)
	if err != nil {
		return nil, fmt.Errorf("AZURE_CLIENT_CERTIFICATE_PATH %s (check AZURE_CLIENT_CERTIFICATE_PASSWORD): %w", path, err)
	}
	chain := os.Getenv("AZURE_CLIENT_SEND_CERTIFICATE_CHAIN")
	return azidentity.NewClientCertificateCredential(os.Getenv("AZURE_TENANT_ID"), os.Getenv("AZURE_CLIENT_ID"), certs, key,
		&azidentity.ClientCertificateCredentialOptions{SendCertificateChain: chain == "1" || strings.EqualFold(chain, "true")})
}

// managedIdentity is a ManagedIdentityCredential that can skip MSAL's process-wide managed identity
// token cache: MSAL hands back a cached token until 5 minutes before it expires (about 99.6% of a
// 24-hour lifetime) and skips the cache only when claims are requested. The claims value is not sent
// to the managed identity endpoint (MSAL v1.10), so any non-empty value serves.
type managedIdentity struct {
	*azidentity.ManagedIdentityCredential
}

// bypassClaims is the claims value that makes MSAL skip its managed identity cache.
const bypassClaims = "{}"

// GetToken implements azcore.TokenCredential.
func (m managedIdentity) GetToken(ctx context.Context, o policy.TokenRequestOptions) (azcore.AccessToken, error) {
	if bypassCache(ctx) && o.Claims == "" {
		o.Claims = bypassClaims
	}
	return m.ManagedIdentityCredential.GetToken(ctx, o)
}

// bypassKey marks a context whose GetToken must not be answered from a token cache.
type bypassKey struct{}

func withBypassCache(ctx context.Context) context.Context {
	return context.WithValue(ctx, bypassKey{}, true)
}

func bypassCache(ctx context.Context) bool {
	b, _ := ctx.Value(bypassKey{}).(bool)
	return b
}
