package main

import (
	"os/exec"
	"strings"
	"testing"
)

// light are the only packages outside the standard library that
// granary-run may link: its reason to exist is a process start without the
// init work of etcd, gRPC, protobuf, prometheus, minio, otel (and x/sys).
var light = map[string]bool{
	"github.com/granary-build/granary/cmd/granary-run":    true,
	"github.com/granary-build/granary/core":               true,
	"github.com/granary-build/granary/internal/agentwire": true,
	"github.com/granary-build/granary/internal/jobrun":    true,
	"github.com/granary-build/granary/internal/paths":     true,
	"github.com/granary-build/granary/internal/thinrun":   true,
}

// heavyDeps returns the packages outside the standard library that pkg
// links and that are not in light.
func heavyDeps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	var heavy []string
	for _, p := range strings.Fields(string(out)) {
		if !light[p] {
			heavy = append(heavy, p)
		}
	}
	return heavy
}

func TestLinksOnlyLightPackages(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command to list the dependencies")
	}
	if heavy := heavyDeps(t, "."); len(heavy) > 0 {
		t.Errorf("granary-run links %d package(s) beyond the standard library and its light ones:\n%s",
			len(heavy), strings.Join(heavy, "\n"))
	}
	// The check sees a heavy dependency: the full binary has etcd's client.
	found := false
	for _, p := range heavyDeps(t, "../granary") {
		found = found || p == "go.etcd.io/etcd/client/v3"
	}
	if !found {
		t.Error("the dependency check does not see go.etcd.io/etcd/client/v3 in cmd/granary")
	}
}
