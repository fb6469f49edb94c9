package main

// Tests that the shipped deployment files match the binary: the Kubernetes manifests in
// deploy/k8s (decoded strictly into the API types) and the Dockerfile's build command.

import (
	"bytes"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"

	"github.com/entra-redis-proxy/entra-redis-proxy/internal/health"
)

const (
	repoDir         = "../.."
	k8sDir          = repoDir + "/deploy/k8s"
	sidecarName     = "entra-redis-proxy" // the proxy's container in deployment.yaml
	metricsPortName = "metrics"           // the proxy's container port for HTTP (probes and /metrics)
	nonrootUID      = 65532               // distroless nonroot, the Dockerfile's USER
	testPodIP       = "10.1.2.3"          // stands in for the downward API's status.podIP
	testVersionID   = "v0.0.0-manifests-test"
)

// k8sManifests is every object in deploy/k8s, decoded strictly.
type k8sManifests struct {
	kustomization   *kustomization
	deployments     []*appsv1.Deployment
	serviceAccounts []*corev1.ServiceAccount
	podMonitors     []*podMonitor
	files           []string // manifest file names
}

// kustomization is the part of kustomize's Kustomization that deploy/k8s uses; a field the
// file adds fails decoding until it is added here (kustomize's own types are a large module).
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
}

// podMonitor is the part of the Prometheus Operator's monitoring.coreos.com/v1 PodMonitor
// that deploy/k8s uses, for the same reason.
type podMonitor struct {
	metav1.TypeMeta `json:",inline"`
	Metadata        metav1.ObjectMeta `json:"metadata"`
	Spec            struct {
		Selector            metav1.LabelSelector `json:"selector"`
		PodMetricsEndpoints []struct {
			Port     string `json:"port"`
			Path     string `json:"path"`
			Interval string `json:"interval"`
		} `json:"podMetricsEndpoints"`
	} `json:"spec"`
}

// readK8sManifests decodes every YAML document in deploy/k8s into its type, rejecting
// unknown and duplicate fields.
func readK8sManifests(t *testing.T) *k8sManifests {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(k8sDir, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	yml, err := filepath.Glob(filepath.Join(k8sDir, "*.yml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(yml) > 0 {
		t.Errorf("%v: name manifests *.yaml so that this test reads them", yml)
	}
	if len(files) == 0 {
		t.Fatalf("no manifests in %s", k8sDir)
	}
	m := &k8sManifests{}
	for _, file := range files {
		name := filepath.Base(file)
		m.files = append(m.files, name)
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(b), -1) {
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Errorf("%s document %d: %v", name, i, err)
				continue
			}
			if tm.Kind == "" && strings.TrimSpace(stripYAMLComments(doc)) == "" {
				continue // an empty document
			}
			var obj any
			switch tm.APIVersion + " " + tm.Kind {
			case "kustomize.config.k8s.io/v1beta1 Kustomization":
				if m.kustomization != nil {
					t.Errorf("%s: a second Kustomization", name)
				}
				m.kustomization = &kustomization{}
				obj = m.kustomization
			case "apps/v1 Deployment":
				d := &appsv1.Deployment{}
				m.deployments = append(m.deployments, d)
				obj = d
			case "v1 ServiceAccount":
				sa := &corev1.ServiceAccount{}
				m.serviceAccounts = append(m.serviceAccounts, sa)
				obj = sa
			case "monitoring.coreos.com/v1 PodMonitor":
				pm := &podMonitor{}
				m.podMonitors = append(m.podMonitors, pm)
				obj = pm
			default:
				t.Errorf("%s document %d: %s %q: no Go type known to this test; add one", name, i, tm.APIVersion, tm.Kind)
				continue
			}
			if err := yaml.UnmarshalStrict([]byte(doc), obj); err != nil {
				t.Errorf("%s document %d (%s): %v", name, i, tm.Kind, err)
			}
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	return m
}

func stripYAMLComments(doc string) string {
	return regexp.MustCompile(`(?m)^\s*#.*$`).ReplaceAllString(doc, "")
}

// configEnvNames returns the environment variables the binary reads: the envconfig keys of
// Config's fields, and whether each is required.
func configEnvNames() map[string]bool {
	names := map[string]bool{}
	t := reflect.TypeFor[Config]()
	for f := range t.Fields() {
		key := f.Tag.Get("envconfig")
		if key == "" {
			key = strings.ToUpper(f.Name) // envconfig's default key
		}
		if !strings.HasPrefix(key, envPrefix+"_") {
			key = envPrefix + "_" + key
		}
		names[key] = f.Tag.Get("required") == "true"
	}
	return names
}

func TestManifestsStrictDecoding(t *testing.T) {
	// The decoding must be able to fail: an unknown field in a container is refused.
	bad := "apiVersion: apps/v1\nkind: Deployment\nspec:\n  template:\n    spec:\n      containers:\n        - name: x\n          imagePullPolicyy: Always\n"
	if err := yaml.UnmarshalStrict([]byte(bad), &appsv1.Deployment{}); err == nil || !strings.Contains(err.Error(), "imagePullPolicyy") {
		t.Errorf("strict decoding accepted an unknown field (err %v)", err)
	}
	m := readK8sManifests(t)
	if m.kustomization == nil {
		t.Fatal("no kustomization.yaml")
	}
	if len(m.deployments) != 1 || len(m.serviceAccounts) != 1 || len(m.podMonitors) != 1 {
		t.Fatalf("%d Deployments, %d ServiceAccounts, %d PodMonitors; the checks below expect one of each",
			len(m.deployments), len(m.serviceAccounts), len(m.podMonitors))
	}
	// Every manifest is a resource of the kustomization, and every resource is a manifest.
	var want []string
	for _, f := range m.files {
		if f != "kustomization.yaml" {
			want = append(want, f)
		}
	}
	got := slices.Clone(m.kustomization.Resources)
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("kustomization resources %v, want the other manifests %v", got, want)
	}
}

func TestManifestsWiring(t *testing.T) {
	m := readK8sManifests(t)
	if len(m.deployments) != 1 || len(m.serviceAccounts) != 1 || len(m.podMonitors) != 1 {
		t.Fatal("want one Deployment, ServiceAccount and PodMonitor (see TestManifestsStrictDecoding)")
	}
	d, sa, pm := m.deployments[0], m.serviceAccounts[0], m.podMonitors[0]
	pod := d.Spec.Template
	var proxy *corev1.Container
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == sidecarName {
			proxy = &pod.Spec.InitContainers[i]
		}
	}
	if proxy == nil {
		t.Fatalf("no init container %q (the proxy as a native sidecar)", sidecarName)
	}
	var port *corev1.ContainerPort
	for i := range proxy.Ports {
		if proxy.Ports[i].Name == metricsPortName {
			port = &proxy.Ports[i]
		}
	}
	if port == nil {
		t.Fatalf("the proxy has no container port named %q", metricsPortName)
	}

	t.Run("native sidecar", func(t *testing.T) {
		if p := proxy.RestartPolicy; p == nil || *p != corev1.ContainerRestartPolicyAlways {
			t.Errorf("restartPolicy %v, want Always (a native sidecar)", p)
		}
		if len(pod.Spec.Containers) == 0 {
			t.Error("no app container")
		}
	})

	t.Run("env names are settings", func(t *testing.T) {
		settings := configEnvNames()
		for _, c := range slices.Concat(pod.Spec.InitContainers, pod.Spec.Containers) {
			for _, e := range c.Env {
				if _, ok := settings[e.Name]; strings.HasPrefix(e.Name, envPrefix+"_") && !ok {
					t.Errorf("container %s: %s is not a setting of the binary", c.Name, e.Name)
				}
			}
		}
		for name, required := range settings {
			if required && !slices.ContainsFunc(proxy.Env, func(e corev1.EnvVar) bool { return e.Name == name }) {
				t.Errorf("the proxy lacks the required setting %s", name)
			}
		}
	})

	// The proxy's environment, with $(VAR) references expanded as the kubelet does.
	env := expandK8sEnv(t, proxy.Env)

	t.Run("settings are valid", func(t *testing.T) {
		for _, kv := range os.Environ() {
			if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, envPrefix+"_") {
				t.Setenv(k, "") // restored after the test
				os.Unsetenv(k)
			}
		}
		for k, v := range env {
			if strings.HasPrefix(k, envPrefix+"_") {
				t.Setenv(k, v)
			}
		}
		cfg, err := loadConfig()
		if err != nil {
			t.Fatalf("the proxy's settings are rejected: %v", err)
		}
		if cfg.Credential != "workload-identity" {
			t.Errorf("credential %q, want workload-identity", cfg.Credential)
		}
		host, p, err := net.SplitHostPort(cfg.HTTPListen)
		if err != nil {
			t.Fatal(err)
		}
		if host != testPodIP {
			t.Errorf("HTTP_LISTEN host %q, want the pod IP from the downward API", host)
		}
		if p != fmt.Sprint(port.ContainerPort) {
			t.Errorf("HTTP_LISTEN port %s, but the %q container port is %d", p, metricsPortName, port.ContainerPort)
		}
	})

	t.Run("probes", func(t *testing.T) {
		for _, tc := range []struct {
			desc  string
			probe *corev1.Probe
			path  string
		}{
			{"startupProbe", proxy.StartupProbe, health.StartupPath},
			{"livenessProbe", proxy.LivenessProbe, health.LivenessPath},
		} {
			if tc.probe == nil || tc.probe.HTTPGet == nil {
				t.Errorf("%s: want an httpGet probe", tc.desc)
				continue
			}
			if tc.probe.HTTPGet.Path != tc.path {
				t.Errorf("%s: path %q, want %q", tc.desc, tc.probe.HTTPGet.Path, tc.path)
			}
			if !probePortIs(tc.probe.HTTPGet.Port, port) {
				t.Errorf("%s: port %v, want the %q container port", tc.desc, tc.probe.HTTPGet.Port.String(), metricsPortName)
			}
		}
		// See deploy/k8s/README.md: the sidecar's readiness would take the app's pod out.
		if proxy.ReadinessProbe != nil {
			t.Error("the proxy has a readinessProbe; the README explains why the sidecar must not")
		}
	})

	t.Run("security context", func(t *testing.T) {
		for _, c := range slices.Concat(pod.Spec.InitContainers, pod.Spec.Containers) {
			sc := c.SecurityContext
			if sc == nil {
				t.Errorf("container %s: no securityContext", c.Name)
				continue
			}
			for _, chk := range []struct {
				desc string
				ok   bool
			}{
				{"runAsNonRoot: true", boolTrue(sc.RunAsNonRoot) || sc.RunAsNonRoot == nil && pod.Spec.SecurityContext != nil && boolTrue(pod.Spec.SecurityContext.RunAsNonRoot)},
				{"readOnlyRootFilesystem: true", boolTrue(sc.ReadOnlyRootFilesystem)},
				{"allowPrivilegeEscalation: false", sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation},
				{"capabilities drop [ALL]", sc.Capabilities != nil && slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) && len(sc.Capabilities.Add) == 0},
				{"seccompProfile RuntimeDefault", sc.SeccompProfile != nil && sc.SeccompProfile.Type == corev1.SeccompProfileTypeRuntimeDefault},
				{"privileged unset or false", sc.Privileged == nil || !*sc.Privileged},
			} {
				if !chk.ok {
					t.Errorf("container %s: want %s", c.Name, chk.desc)
				}
			}
		}
		if sc := proxy.SecurityContext; sc != nil && (sc.RunAsUser == nil || *sc.RunAsUser != nonrootUID || !boolTrue(sc.RunAsNonRoot)) {
			t.Errorf("the proxy: want runAsNonRoot: true and runAsUser: %d (the image's USER)", nonrootUID)
		}
	})

	t.Run("workload identity", func(t *testing.T) {
		if pod.Labels["azure.workload.identity/use"] != "true" {
			t.Error(`pod template lacks the label azure.workload.identity/use: "true"`)
		}
		if pod.Spec.ServiceAccountName != sa.Name {
			t.Errorf("serviceAccountName %q, want the ServiceAccount %q", pod.Spec.ServiceAccountName, sa.Name)
		}
		if sa.Annotations["azure.workload.identity/client-id"] == "" {
			t.Error("the ServiceAccount lacks the annotation azure.workload.identity/client-id")
		}
		if v := env[envPrefix+"_CREDENTIAL"]; v != "workload-identity" {
			t.Errorf("%s_CREDENTIAL %q, want workload-identity", envPrefix, v)
		}
	})

	t.Run("selectors", func(t *testing.T) {
		if !selectorMatches(d.Spec.Selector, pod.Labels) {
			t.Errorf("the Deployment's selector %v does not select its pods %v", d.Spec.Selector, pod.Labels)
		}
		if !selectorMatches(&pm.Spec.Selector, pod.Labels) {
			t.Errorf("the PodMonitor's selector %v does not select the pods %v", pm.Spec.Selector, pod.Labels)
		}
	})

	t.Run("pod monitor", func(t *testing.T) {
		if len(pm.Spec.PodMetricsEndpoints) != 1 {
			t.Fatalf("%d podMetricsEndpoints, want 1", len(pm.Spec.PodMetricsEndpoints))
		}
		e := pm.Spec.PodMetricsEndpoints[0]
		if e.Port != metricsPortName {
			t.Errorf("PodMonitor port %q, want %q", e.Port, metricsPortName)
		}
		if e.Path != "" && e.Path != "/metrics" {
			t.Errorf("PodMonitor path %q, want /metrics", e.Path)
		}
	})
}

// expandK8sEnv returns a container's environment as the kubelet sets it: $(NAME) refers to
// a variable defined earlier in the list, and the downward API's status.podIP is testPodIP.
func expandK8sEnv(t *testing.T, vars []corev1.EnvVar) map[string]string {
	t.Helper()
	env := map[string]string{}
	ref := regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)
	for _, e := range vars {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = ref.ReplaceAllStringFunc(e.Value, func(s string) string {
				name := ref.FindStringSubmatch(s)[1]
				v, ok := env[name]
				if !ok {
					t.Errorf("%s refers to $(%s), which is not defined before it (the kubelet would leave it as is)", e.Name, name)
				}
				return v
			})
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.podIP":
			env[e.Name] = testPodIP
		default:
			t.Errorf("%s: valueFrom that this test does not know; teach expandK8sEnv", e.Name)
		}
	}
	return env
}

func probePortIs(p intstr.IntOrString, port *corev1.ContainerPort) bool {
	if p.Type == intstr.String {
		return p.StrVal == port.Name
	}
	return p.IntVal == port.ContainerPort
}

func selectorMatches(s *metav1.LabelSelector, labels map[string]string) bool {
	if s == nil || len(s.MatchLabels) == 0 || len(s.MatchExpressions) > 0 {
		return false // only matchLabels is used here
	}
	for k, v := range s.MatchLabels {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func boolTrue(b *bool) bool { return b != nil && *b }

func TestDockerfile(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoDir, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	lines := dockerfileInstructions(string(b))
	last := -1 // the final stage's FROM
	for i, l := range lines {
		if strings.HasPrefix(l, "FROM ") {
			last = i
		}
	}
	if last < 0 {
		t.Fatal("no FROM in the Dockerfile")
	}
	final := lines[last:]
	for _, tc := range []struct {
		desc string
		re   string
	}{
		{"final stage distroless static nonroot", `(?m)^FROM gcr\.io/distroless/static-debian12:nonroot$`},
		{"numeric USER", fmt.Sprintf(`(?m)^USER %d:%d$`, nonrootUID, nonrootUID)},
		{"exec-form ENTRYPOINT", `(?m)^ENTRYPOINT \["/entra-redis-proxy"\]$`},
		{"OCI version label", `org\.opencontainers\.image\.version="\$\{VERSION\}"`},
		{"OCI source label", `org\.opencontainers\.image\.source=`},
	} {
		if !regexp.MustCompile(tc.re).MatchString(strings.Join(final, "\n")) {
			t.Errorf("%s: the final stage has no line matching %s", tc.desc, tc.re)
		}
	}
	if !slices.ContainsFunc(lines[:last], regexp.MustCompile(`^FROM golang:1\.26[0-9.]*-bookworm AS \S+$`).MatchString) {
		t.Error("want a builder stage FROM golang:1.26-bookworm (the Go version of go.mod, pinned to a Debian release)")
	}
}

// TestDockerfileBuild runs the Dockerfile's go build command, parsed from its RUN line, on
// a copy of the build context filtered by .dockerignore, and checks that the result is a
// static, stripped, version-stamped Linux binary.
func TestDockerfileBuild(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoDir, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	cmdEnv, args := dockerfileGoBuild(t, string(b))
	ctxDir := t.TempDir()
	copyDockerContext(t, repoDir, ctxDir)
	out := filepath.Join(t.TempDir(), "entra-redis-proxy")
	for i := range args {
		if i > 0 && args[i-1] == "-o" {
			args[i] = out
		}
	}
	if !slices.Contains(args, out) {
		t.Fatalf("the go build command has no -o: %q", args)
	}
	cmd := exec.Command("go", args...)
	cmd.Dir = ctxDir // the Dockerfile's WORKDIR holds the context
	// GOOS as in the golang image; GOFLAGS cleared as there (no VCS in the context anyway).
	cmd.Env = append(os.Environ(), "GOOS=linux", "GOFLAGS=")
	cmd.Env = append(cmd.Env, cmdEnv...)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %s: %v\n%s", strings.Join(args, " "), err, b)
	}

	f, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the binary has a PT_INTERP program header: it is dynamically linked")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Errorf("the binary imports %v", libs)
	}
	if _, err := f.Symbols(); !errors.Is(err, elf.ErrNoSymbols) {
		t.Errorf("the binary has a symbol table (want -s): %v", err)
	}
	bin, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(bin, []byte(testVersionID)) {
		t.Errorf("the binary does not contain the version %q: -X main.version did not take effect (is main.version a string variable?)", testVersionID)
	}
	if bytes.Contains(bin, []byte(ctxDir)) {
		t.Errorf("the binary contains the build directory %s (want -trimpath)", ctxDir)
	}
}

// dockerfileInstructions returns the Dockerfile's instructions, one a line: continuation
// lines joined, comments and blank lines dropped.
func dockerfileInstructions(s string) []string {
	var out []string
	var cur strings.Builder
	for line := range strings.Lines(s) {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "#") || line == "" { // also inside a continuation, as Docker does
			continue
		}
		if l, ok := strings.CutSuffix(line, `\`); ok {
			cur.WriteString(l + " ")
			continue
		}
		cur.WriteString(line)
		out = append(out, cur.String())
		cur.Reset()
	}
	return out
}

// dockerfileGoBuild returns the environment assignments and go arguments of the
// Dockerfile's single RUN line that runs go build, with ARG values substituted (VERSION
// replaced by testVersionID).
func dockerfileGoBuild(t *testing.T, dockerfile string) (env, args []string) {
	t.Helper()
	argDefaults := map[string]string{"VERSION": testVersionID}
	var run []string
	for _, l := range dockerfileInstructions(dockerfile) {
		if a, ok := strings.CutPrefix(l, "ARG "); ok {
			k, v, _ := strings.Cut(a, "=")
			if _, set := argDefaults[k]; !set {
				argDefaults[k] = v
			}
		}
		if strings.HasPrefix(l, "RUN ") && strings.Contains(l, "go build") {
			run = append(run, strings.TrimPrefix(l, "RUN "))
		}
	}
	if len(run) != 1 {
		t.Fatalf("%d RUN lines with go build in the Dockerfile, want 1", len(run))
	}
	words, err := shellWords(run[0])
	if err != nil {
		t.Fatalf("RUN %s: %v", run[0], err)
	}
	for len(words) > 0 && strings.HasPrefix(words[0], "--") { // RUN flags: --mount=...
		words = words[1:]
	}
	expand := func(s string) string {
		return os.Expand(s, func(k string) string {
			v, ok := argDefaults[k]
			if !ok {
				t.Errorf("RUN line uses $%s, which is not an ARG", k)
			}
			return v
		})
	}
	for len(words) > 0 && regexp.MustCompile(`^[A-Z_][A-Z0-9_]*=`).MatchString(words[0]) {
		env = append(env, expand(words[0]))
		words = words[1:]
	}
	if len(words) < 2 || words[0] != "go" || words[1] != "build" {
		t.Fatalf("RUN %s: want [VAR=value...] go build ... and nothing else (no && or ;)", run[0])
	}
	for _, w := range words[1:] {
		if strings.ContainsAny(w, ";&|<>`") {
			t.Fatalf("RUN %s: %q: keep the go build command alone on its RUN line", run[0], w)
		}
		args = append(args, expand(w))
	}
	if !slices.Contains(env, "CGO_ENABLED=0") {
		t.Errorf("RUN %s: want CGO_ENABLED=0", run[0])
	}
	return env, args
}

// shellWords splits a command line as sh would for the simple forms a Dockerfile RUN line
// uses: blanks, double quotes (with $ left for expansion) and single quotes.
func shellWords(s string) ([]string, error) {
	var words []string
	var cur strings.Builder
	inWord := false
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case ' ', '\t':
			if inWord {
				words = append(words, cur.String())
				cur.Reset()
				inWord = false
			}
		case '"', '\'':
			j := strings.IndexByte(s[i+1:], c)
			if j < 0 {
				return nil, fmt.Errorf("unterminated %c", c)
			}
			cur.WriteString(s[i+1 : i+1+j])
			i += j + 1
			inWord = true
		case '\\':
			return nil, errors.New("backslash escapes are not supported here")
		default:
			cur.WriteByte(c)
			inWord = true
		}
	}
	if inWord {
		words = append(words, cur.String())
	}
	return words, nil
}

// copyDockerContext copies the files of src that .dockerignore lets into the build
// context to dst.
func copyDockerContext(t *testing.T, src, dst string) {
	t.Helper()
	ignored := dockerignore(t, filepath.Join(src, ".dockerignore"))
	var n, size int64
	err := filepath.WalkDir(src, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil || rel == "." {
			return err
		}
		rel = filepath.ToSlash(rel)
		if ignored(rel) {
			if e.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		target := filepath.Join(dst, filepath.FromSlash(rel))
		switch {
		case e.IsDir():
			return os.MkdirAll(target, 0o755)
		case e.Type().IsRegular():
			info, err := e.Info()
			if err != nil {
				return err
			}
			n, size = n+1, size+info.Size()
			return copyContextFile(p, target)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("build context: %d files, %d bytes", n, size)
}

func copyContextFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// dockerignore returns a matcher for the patterns of a .dockerignore file, with Docker's
// rules: paths relative to the context root, * and ? within one path element, ** across
// elements, a match on a directory covers what is below it. Exceptions (!) and character
// classes are not supported: the test refuses them.
func dockerignore(t *testing.T, file string) func(rel string) bool {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var pats []*regexp.Regexp
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		p := strings.TrimPrefix(path.Clean(line), "/")
		if strings.ContainsAny(p, `![\`) {
			t.Fatalf(".dockerignore: %q: exceptions, character classes and escapes are not supported by this test", line)
		}
		var re strings.Builder
		re.WriteString("^")
		for i := 0; i < len(p); i++ {
			switch {
			case strings.HasPrefix(p[i:], "**/"):
				re.WriteString("(.*/)?")
				i += 2
			case strings.HasPrefix(p[i:], "**"):
				re.WriteString(".*")
				i++
			case p[i] == '*':
				re.WriteString("[^/]*")
			case p[i] == '?':
				re.WriteString("[^/]")
			default:
				re.WriteString(regexp.QuoteMeta(p[i : i+1]))
			}
		}
		re.WriteString("$")
		pats = append(pats, regexp.MustCompile(re.String()))
	}
	return func(rel string) bool {
		// The path or one of its parent directories.
		for prefix := rel; prefix != "."; prefix = path.Dir(prefix) {
			for _, re := range pats {
				if re.MatchString(prefix) {
					return true
				}
			}
		}
		return false
	}
}

func TestDockerignore(t *testing.T) {
	ignored := dockerignore(t, filepath.Join(repoDir, ".dockerignore"))
	for _, tc := range []struct {
		rel  string
		want bool
	}{
		{".git", true},
		{".git/objects/ab", true},
		{".bench/run1.txt", true},
		{"proxy/session_test.go", true},
		{"entra-redis-proxy.test", true},
		{"resp/resp.test", true},
		{"cpu.prof", true},
		{"proxy/bench.out", true},
		{"deploy/k8s/deployment.yaml", true},
		{"go.mod", false},
		{"go.sum", false},
		{"cmd/entra-redis-proxy/main.go", false},
		{"proxy/session.go", false},
		{"internal/health/health.go", false},
	} {
		if got := ignored(tc.rel); got != tc.want {
			t.Errorf("%s ignored: %v, want %v", tc.rel, got, tc.want)
		}
	}
}
