package main

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// lab reports whether granary must not link pkg: the test harnesses (the
// standard library's and ours, whose names end in "test": etcdtest,
// netfstest, coretest) and the lab, cmd/granary-bench's (the benchmarks,
// the farm simulation, the PNG chart). Their initialisers cost every
// granary process its start, and their code is no part of the product.
func lab(pkg string) bool {
	const mod = "github.com/granary-build/granary/"
	switch {
	case pkg == "testing", strings.HasPrefix(pkg, "testing/"), pkg == "net/http/httptest":
		return true
	case pkg == "golang.org/x/image", strings.HasPrefix(pkg, "golang.org/x/image/"):
		return true
	case strings.HasPrefix(pkg, mod) && strings.HasSuffix(pkg, "test"):
		return true
	}
	return pkg == mod+"internal/bench" || pkg == mod+"cmd/granary-bench"
}

// labDeps returns the packages pkg links that lab forbids, each with the
// import chain that pulls it in.
func labDeps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}} {{join .Imports \" \"}}", pkg).Output()
	if err != nil {
		t.Fatalf("go list -deps %s: %v", pkg, err)
	}
	imports := map[string][]string{}
	var order []string // dependencies first, pkg last
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		imports[f[0]], order = f[1:], append(order, f[0])
	}
	// A breadth-first walk from pkg finds the shortest chain to each.
	root := order[len(order)-1]
	via := map[string]string{root: ""}
	for queue := []string{root}; len(queue) > 0; queue = queue[1:] {
		for _, dep := range imports[queue[0]] {
			if _, seen := via[dep]; !seen {
				via[dep] = queue[0]
				queue = append(queue, dep)
			}
		}
	}
	var bad []string
	for _, p := range order {
		if !lab(p) {
			continue
		}
		chain := []string{p}
		for q := via[p]; q != ""; q = via[q] {
			chain = append(chain, q)
		}
		slices.Reverse(chain)
		bad = append(bad, strings.Join(chain, " → "))
	}
	return bad
}

// TestLinksNoLab holds granary's dependency budget: no testing, no test
// harness, no benchmarks, no chart library.
func TestLinksNoLab(t *testing.T) {
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go command to list the dependencies")
	}
	if bad := labDeps(t, "."); len(bad) > 0 {
		t.Errorf("granary links %d package(s) of the lab or of tests (they belong in cmd/granary-bench or in _test files):\n%s",
			len(bad), strings.Join(bad, "\n"))
	}
	// The check sees them where they are: the lab's own binary.
	want := map[string]bool{"testing": false, "github.com/granary-build/granary/internal/bench": false, "golang.org/x/image/font": false}
	for _, chain := range labDeps(t, "../granary-bench") {
		p := chain[strings.LastIndex(chain, " ")+1:]
		if _, ok := want[p]; ok {
			want[p] = true
		}
	}
	for p, seen := range want {
		if !seen {
			t.Errorf("the dependency check does not see %s in cmd/granary-bench", p)
		}
	}
}
