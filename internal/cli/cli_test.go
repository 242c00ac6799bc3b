package cli

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
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

func TestMessagePlain(t *testing.T) {
	be := &etcdstore.BuildError{ID: "pkg", Host: "h1", PID: 7, LogDir: "/r/pkgs/pkg/logs",
		Err: &etcdstore.PanicError{Value: "kaput", Stack: []byte("goroutine 1 [running]:\n...")}}
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"build error", fmt.Errorf("etcdstore: build %q: %w", "pkg", be),
			`granary: build "pkg": build "pkg" failed on h1 (pid 7): builder panicked: kaput (stack in the log) (logs in /r/pkgs/pkg/logs)`},
		{"double prefix", fmt.Errorf("granary: inspect: %w", fmt.Errorf("etcdstore: inspect %q: %w", "x", core.ErrPackageNotExist)),
			`granary: inspect: inspect "x": package does not exist`},
		{"no leader", fmt.Errorf("etcdstore: list: %w", errors.New("etcdserver: no leader")),
			"granary: list: etcd has no leader: quorum lost (a majority of the etcd members must be up)"},
		{"lease lost", fmt.Errorf("granary: build abandoned: %w", etcdstore.ErrLeaseLost),
			"granary: build abandoned: the lease with etcd was lost"},
		{"store prefix inside", fmt.Errorf("granary: %w", fmt.Errorf("etcdstore: build %q: %w", "x", context.DeadlineExceeded)),
			`granary: build "x": context deadline exceeded`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Message(tt.err)
			if got != tt.want {
				t.Errorf("Message = %q\nwant      %q", got, tt.want)
			}
			if strings.Contains(got, "\n") || strings.Contains(got, "etcdstore:") {
				t.Errorf("Message %q is not one plain line", got)
			}
		})
	}
}
