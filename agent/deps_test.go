package agent_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestLinksOnlyStdlibAndCore holds the package's dependency budget: a
// program that connects to the node must not link the node (etcd's server
// and client, gRPC, protobuf, prometheus), nor net, whose cgo resolver
// makes a binary dynamically linked.
func TestLinksOnlyStdlibAndCore(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command to list the dependencies")
	}
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.Standard}} {{.ImportPath}}", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	allowed := map[string]bool{
		"github.com/granary-build/granary/agent": true,
		"github.com/granary-build/granary/core":  true,
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		std, p, _ := strings.Cut(line, " ")
		switch {
		case std == "true" && (p == "net" || p == "runtime/cgo"):
			t.Errorf("agent links %s", p)
		case std != "true" && !allowed[p]:
			t.Errorf("agent links %s: only the standard library and core are allowed", p)
		}
	}
}

// TestConnectOnlyIsSmall: a program that only calls Connect is under
// 8 MB (one that imported package node for it was 23 MB).
func TestConnectOnlyIsSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a program")
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command to build with")
	}
	bin := filepath.Join(t.TempDir(), "connectonly")
	cmd := exec.Command("go", "build", "-o", bin, "./testdata/connectonly")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	st, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}
	const budget = 8 << 20
	t.Logf("a connect-only program is %.1f MB", float64(st.Size())/(1<<20))
	if st.Size() >= budget {
		t.Errorf("a connect-only program is %d bytes, want under %d", st.Size(), budget)
	}
}
