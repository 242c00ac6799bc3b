package jobrun

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/core"
)

// testRef is a connection whose end and notices the test controls.
type testRef struct {
	pid     int
	done    chan struct{}
	notices chan agent.Notice
	mu      sync.Mutex
	closed  bool
}

func newRef(pid int) *testRef {
	return &testRef{pid: pid, done: make(chan struct{}), notices: make(chan agent.Notice, 4)}
}

func (r *testRef) Done() <-chan struct{}        { return r.done }
func (r *testRef) Err() error                   { return agent.ErrNodeGone }
func (r *testRef) Notices() <-chan agent.Notice { return r.notices }
func (r *testRef) NodePID() int                 { return r.pid }

func (r *testRef) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	return nil
}

func (r *testRef) isClosed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}

// output is a job's stdout and stderr: files (the command is forked and
// executed by Run itself) or buffers (through os/exec).
type output struct {
	stdout, stderr io.Writer
	read           func() (string, string)
}

func outputs(t *testing.T) map[string]func() output {
	return map[string]func() output{
		"files": func() output {
			dir := t.TempDir()
			o, err := os.Create(filepath.Join(dir, "out"))
			if err != nil {
				t.Fatal(err)
			}
			e, err := os.Create(filepath.Join(dir, "err"))
			if err != nil {
				t.Fatal(err)
			}
			return output{o, e, func() (string, string) {
				o.Close()
				e.Close()
				bo, _ := os.ReadFile(o.Name())
				be, _ := os.ReadFile(e.Name())
				return string(bo), string(be)
			}}
		},
		"buffers": func() output {
			var o, e bytes.Buffer
			return output{&o, &e, func() (string, string) { return o.String(), e.String() }}
		},
	}
}

// exitCode is ExitErr's code, 0 for nil, -1 for anything else.
func exitCode(err error) int {
	var ee *ExitErr
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.Code
	}
	return -1
}

func TestRunPassesExit(t *testing.T) {
	tests := []struct {
		name     string
		argv     []string
		code     int
		stdout   string
		errMatch string
	}{
		{"success, with $GRANARY_PKG", []string{"sh", "-c", `echo "$GRANARY_PKG"`}, 0, "/pkgs/p\n", ""},
		{"exit status", []string{"sh", "-c", "exit 7"}, 7, "", ""},
		{"killed by a signal", []string{"sh", "-c", "kill -9 $$"}, 137, "", ""},
		{"cannot start", []string{"/nonexistent/cmd"}, 127, "", "granary: run /nonexistent/cmd: fork/exec /nonexistent/cmd: no such file or directory"},
		{"not in $PATH", []string{"no-such-command-here"}, 127, "", `granary: run no-such-command-here: exec: "no-such-command-here": executable file not found in $PATH`},
	}
	for kind, mk := range outputs(t) {
		for _, tt := range tests {
			t.Run(kind+"/"+tt.name, func(t *testing.T) {
				out := mk()
				r := newRef(1)
				j := &Job{ID: "p", Argv: tt.argv, Pkg: "/pkgs/p", Stdout: out.stdout, Stderr: out.stderr}
				err := j.Run(context.Background(), r)
				if got := exitCode(err); got != tt.code {
					t.Errorf("exit code %d (%v), want %d", got, err, tt.code)
				}
				if tt.errMatch != "" && (err == nil || err.Error() != tt.errMatch) {
					t.Errorf("error %q, want %q", err, tt.errMatch)
				}
				if o, _ := out.read(); o != tt.stdout {
					t.Errorf("stdout %q, want %q", o, tt.stdout)
				}
				if !r.isClosed() {
					t.Error("the reference's connection was not closed")
				}
			})
		}
	}
}

// A ref_lost notice about the job's package stops the command and says
// why; one about another package does not.
func TestRunStopsOnRefLost(t *testing.T) {
	for kind, mk := range outputs(t) {
		t.Run(kind, func(t *testing.T) {
			out := mk()
			r := newRef(1)
			r.notices <- agent.Notice{Kind: agent.NoticeRefLost, ID: "other", Err: errors.New("x")}
			r.notices <- agent.Notice{Kind: agent.NoticeRefLost, ID: "p", Err: errors.New("package removed")}
			j := &Job{ID: "p", Argv: []string{"sleep", "1000"}, Stdout: out.stdout, Stderr: out.stderr}
			err := j.Run(context.Background(), r)
			want := "granary: sleep stopped: the reference to p was lost (package removed); the package may be gone"
			if exitCode(err) != ExitError || err.Error() != want {
				t.Errorf("Run = %v (code %d), want %q (code %d)", err, exitCode(err), want, ExitError)
			}
			if _, e := out.read(); !strings.Contains(e, "granary: the reference to p was lost (package removed); the package may be gone: stopping sleep\n") {
				t.Errorf("stderr %q does not say why the command stops", e)
			}
		})
	}
}

// The node goes away: Run takes the reference again through Hold (which
// fails at first) and keeps the command running; if the package is gone,
// it stops the command.
func TestRunReconnects(t *testing.T) {
	tests := []struct {
		name    string
		holdErr error // Hold's error after its first failure; nil: it succeeds
		code    int
		stderr  string
	}{
		{"reconnected", nil, 0, "granary: reconnected to the local node (pid 2); holding p again\n"},
		{"package gone", fmt.Errorf("incref: %w", core.ErrPackageNotExist), ExitError,
			"granary: the package p is gone: it was removed while the local node was away: stopping sh\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			// The command runs until the test lets it finish (the file
			// "go" appears): once Run has said it holds the package again.
			stderr := &watchWriter{on: "holding p again", do: func() { os.WriteFile(filepath.Join(dir, "go"), nil, 0o644) }} //nolint:errcheck
			first, second := newRef(1), newRef(2)
			holds := 0
			j := &Job{
				ID: "p", Stderr: stderr,
				Argv: []string{"sh", "-c", `while [ ! -e "$1/go" ]; do sleep 0.01; done`, "sh", dir},
				Hold: func(ctx context.Context) (Ref, error) {
					holds++
					if holds == 1 {
						return nil, errors.New("no node yet")
					}
					if tt.holdErr != nil {
						return nil, tt.holdErr
					}
					return second, nil
				},
			}
			close(first.done)
			err := j.Run(context.Background(), first)
			if got := exitCode(err); got != tt.code {
				t.Errorf("exit code %d (%v), want %d", got, err, tt.code)
			}
			if holds != 2 {
				t.Errorf("Hold called %d times, want 2", holds)
			}
			if !strings.Contains(stderr.String(), "granary: the local node went away") || !strings.Contains(stderr.String(), tt.stderr) {
				t.Errorf("stderr %q, want the node's departure and %q", stderr.String(), tt.stderr)
			}
			if tt.holdErr == nil && !second.isClosed() {
				t.Error("the new connection was not closed at the end")
			}
		})
	}
}

// watchWriter is a buffer that calls do once what was written contains on.
type watchWriter struct {
	mu   sync.Mutex
	buf  bytes.Buffer
	on   string
	do   func()
	done bool
}

func (w *watchWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if !w.done && strings.Contains(w.buf.String(), w.on) {
		w.done = true
		w.do()
	}
	return len(p), nil
}

func (w *watchWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}
