package soak

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"go.etcd.io/etcd/client/pkg/v3/testutil"
)

// TestMain fails the run if goroutines outlive the tests.
func TestMain(m *testing.M) { testutil.MustTestMainWithLeakDetection(m) }

// binaries are the programs the soak runs.
type binaries struct {
	granary    string // ./cmd/granary: serve, build, rm, gc (and run, when granary-run hands a job over)
	granaryRun string // ./cmd/granary-run, next to granary, where it looks for the full binary
	etcd       string // etcd's server, of the version in go.mod
	job        string // testdata/soakjob: the builder and the job
}

// buildBinaries builds the binaries into a directory of t, once per run of
// the test, without -race (what runs under the race detector is this
// test's own code; the binaries have their own tests) and with the e2e
// image's flags, so that Go's build cache serves the etcd server built by
// node's frozen-member test and by the image.
func buildBinaries(t *testing.T) binaries {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", dir+string(filepath.Separator),
		"github.com/granary-build/granary/cmd/granary",
		"github.com/granary-build/granary/cmd/granary-run",
		"go.etcd.io/etcd/server/v3",
		"./testdata/soakjob")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return binaries{
		granary:    filepath.Join(dir, "granary"),
		granaryRun: filepath.Join(dir, "granary-run"),
		etcd:       filepath.Join(dir, "server"), // the module's last element before /v3
		job:        filepath.Join(dir, "soakjob"),
	}
}
