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
	"github.com/granary-build/granary/cmd/granary-run":  true,
	"github.com/granary-build/granary/core":             true,
	"github.com/granary-build/granary/agent":            true,
	"github.com/granary-build/granary/internal/jobrun":  true,
	"github.com/granary-build/granary/internal/paths":   true,
	"github.com/granary-build/granary/internal/thinrun": true,
}

// heavyStd are the standard packages granary-run must not link: net's cgo
// resolver makes a binary dynamically linked, and loading libc at start
// costs more than the rest of a warm job.
var heavyStd = map[string]bool{"net": true, "runtime/cgo": true}

// heavyDeps returns the packages pkg links that are neither standard nor
// in light, and the standard ones in heavyStd.
func heavyDeps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.Standard}} {{.ImportPath}}", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	var heavy []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		std, p, _ := strings.Cut(line, " ")
		if std == "true" && heavyStd[p] || std != "true" && !light[p] {
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
		t.Errorf("granary-run links %d heavy package(s) (beyond its light ones, or net/cgo):\n%s",
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
