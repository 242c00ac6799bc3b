package cli

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/node"
)

func TestExitCode(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want int
	}{
		{"nil", nil, 0},
		{"plain", errors.New("boom"), 1},
		{"not exist", fmt.Errorf("x: %w", core.ErrPackageNotExist), 3},
		{"invalid id", fmt.Errorf("x: %w", core.ErrInvalidID), 2},
		{"usage", usageErr("ls", "bad"), 2},
		{"child code", &ExitErr{Code: 42}, 42},
		{"wrapped exit", fmt.Errorf("ctx: %w", &ExitErr{Code: 7, Err: errors.New("x")}), 7},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ExitCode(tt.err); got != tt.want {
				t.Errorf("ExitCode(%v) = %d, want %d", tt.err, got, tt.want)
			}
		})
	}
	if m := Message(&ExitErr{Code: 3}); m != "" {
		t.Errorf("Message of a silent ExitErr = %q, want empty", m)
	}
	if m := Message(errors.New("boom")); m != "granary: boom" {
		t.Errorf("Message = %q, want the granary prefix", m)
	}
}

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"1024", 1024, true},
		{"10K", 10 << 10, true},
		{"1.5G", 3 << 29, true},
		{"20GiB", 20 << 30, true},
		{"2tb", 2 << 40, true},
		{"", 0, false},
		{"-1G", 0, false},
		{"ten", 0, false},
		{"99999999999P", 0, false}, // overflows int64: refused, not wrapped negative
		{"inf", 0, false},
		{"NaN", 0, false},
		{"8191P", 8191 << 50, true},
	}
	for _, tt := range tests {
		got, err := parseSize(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

// TestMessagePlain holds plainErr's table: each case wraps one entry's
// error, as the store, the node or etcd's client would, and fails if that
// entry is removed (its text would show instead of its sentence).
func TestMessagePlain(t *testing.T) {
	panicked := &etcdstore.PanicError{Value: "kaput", Stack: []byte("goroutine 1 [running]:\n...")}
	be := &etcdstore.BuildError{ID: "pkg", Host: "h1", PID: 7, LogDir: "/r/pkgs/pkg/logs", Err: errors.New("exit status 2")}
	nsr := &etcdstore.NotSharedRootError{Root: "/mnt/other", What: "/mnt/other does not exist", Cluster: "c1", Prefix: "/granary/",
		Shared: etcdstore.RootRecord{RootID: "r1", Host: "h2", Path: "/mnt/granary", BoundAt: time.Unix(0, 0)}}
	tests := []struct {
		name string
		err  error
		is   error // the sentinel err must wrap (errors.Is), if any
		want string
	}{
		{"build error", fmt.Errorf("incref %q: %w", "pkg", be), core.ErrBuildFailed,
			`granary: incref "pkg": build "pkg" failed on h1 (pid 7): exit status 2 (logs in /r/pkgs/pkg/logs)`},
		{"not the shared root", nsr, etcdstore.ErrNotSharedRoot,
			`granary: not the shared root of this prefix: /mnt/other does not exist; the shared root of prefix "/granary/" is /mnt/granary (bound by h2). ` +
				`Is the shared volume mounted? To make /mnt/other the new shared root: granary init-root --root /mnt/other`},
		{"panic", fmt.Errorf("build %q: %w", "pkg", panicked), nil,
			`granary: build "pkg": builder panicked: kaput (stack in the log)`},
		{"panic in a build error", &etcdstore.BuildError{ID: "pkg", Host: "h1", PID: 7, LogDir: "/l", Err: panicked}, core.ErrBuildFailed,
			`granary: build "pkg" failed on h1 (pid 7): builder panicked: kaput (stack in the log) (logs in /l)`},
		{"lease lost", fmt.Errorf("build %q: %w", "x", etcdstore.ErrLeaseLost), etcdstore.ErrLeaseLost,
			`granary: build "x": the lease with etcd was lost`},
		{"lease lost through the node", node.StoreError(&agent.Error{Msg: `incref "x": lease lost`, Codes: []string{agent.CodeLeaseLost}}), etcdstore.ErrLeaseLost,
			`granary: incref "x": the lease with etcd was lost`},
		{"fenced", fmt.Errorf("build %q: %w", "x", etcdstore.ErrFenced), etcdstore.ErrFenced,
			`granary: build "x": the build lock was lost before publishing`},
		{"closed", fmt.Errorf("incref %q: %w", "x", etcdstore.ErrClosed), etcdstore.ErrClosed,
			`granary: incref "x": the store was closed`},
		{"collector busy", fmt.Errorf("prune: %w", etcdstore.ErrCollectorBusy), etcdstore.ErrCollectorBusy,
			"granary: prune: another collector is sweeping"},
		{"no leader", fmt.Errorf("list: %w", rpctypes.ErrNoLeader), rpctypes.ErrNoLeader,
			"granary: list: etcd has no leader: quorum lost (a majority of the etcd members must be up)"},
		// What etcd's client returns for the server's gRPC status
		// (clientv3.ContextError): errors.Is finds it too.
		{"no leader from gRPC", fmt.Errorf("list: %w", rpctypes.Error(rpctypes.ErrGRPCNoLeader)), rpctypes.ErrNoLeader,
			"granary: list: etcd has no leader: quorum lost (a majority of the etcd members must be up)"},
		{"none", fmt.Errorf("inspect %q: %w", "x", core.ErrPackageNotExist), core.ErrPackageNotExist,
			`granary: inspect "x": package does not exist`},
	}
	said := make([]bool, len(sentences))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.is != nil && !errors.Is(tt.err, tt.is) {
				t.Fatalf("errors.Is(%v, %v) = false", tt.err, tt.is)
			}
			got := Message(tt.err)
			if got != tt.want {
				t.Errorf("Message = %q\nwant      %q", got, tt.want)
			}
			if strings.Contains(got, "\n") || strings.Count(got, "granary: ") != 1 {
				t.Errorf("Message %q is not one line with one prefix", got)
			}
		})
		for i, s := range sentences {
			if _, _, ok := s(tt.err); ok {
				said[i] = true
			}
		}
	}
	for i, ok := range said {
		if !ok {
			t.Errorf("sentences[%d] has no case here", i)
		}
	}
}
