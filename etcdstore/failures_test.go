package etcdstore_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/internal/etcdtest"
)

// TestFailureMemory: a failed attempt leaves a record that outlives the
// store (and so the builder's lease), each attempt's log survives the next
// attempt, a panic gives a one-line error with the stack in a log file, and
// DropFailures removes the record.
func TestFailureMemory(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	ctx := context.Background()

	a := newStore(t, srv, root, etcdstore.WithHost("host-a"), etcdstore.WithKeptLogs(2))
	boom := errors.New("boom")
	err := a.Handle("pkg").Build(func() error {
		os.WriteFile(filepath.Join(a.Handle("pkg").LoggingDirectory(), "attempt-1.log"), []byte("one\n"), 0o644)
		return boom
	})
	if !errors.Is(err, boom) || !errors.Is(err, core.ErrBuildFailed) {
		t.Fatalf("Build = %v, want boom and ErrBuildFailed", err)
	}
	a.Close() // its lease, and so P/build/pkg, goes
	// The first attempt's log is older than the next attempt by more than
	// the 10 ms slack attemptLogs allows for mtime skew: make it so even
	// when the next lines run within 10 ms.
	old := time.Now().Add(-time.Second)
	if err := os.Chtimes(filepath.Join(a.Handle("pkg").LoggingDirectory(), "attempt-1.log"), old, old); err != nil {
		t.Fatal(err)
	}

	b := newStore(t, srv, root, etcdstore.WithHost("host-b"), etcdstore.WithKeptLogs(2))
	fr, err := b.LastFailure(ctx, "pkg")
	if err != nil || fr == nil {
		t.Fatalf("LastFailure after the builder's store closed = %v, %v; want a record", fr, err)
	}
	if fr.Host != "host-a" || fr.Error != "boom" || fr.Number != 1 || len(fr.Logs) != 1 || filepath.Base(fr.Logs[0]) != "attempt-1.log" {
		t.Fatalf("record = %+v; want host-a, boom, number 1, logs [attempt-1.log]", fr)
	}
	if got := time.Until(fr.Expires); got < 23*time.Hour {
		t.Fatalf("record expires in %v, want about the default day", got)
	}

	// The second attempt panics.
	err = b.Handle("pkg").Build(func() error { panic("kaput") })
	var pe *etcdstore.PanicError
	if !errors.As(err, &pe) || len(pe.Stack) == 0 {
		t.Fatalf("Build = %v, want a *PanicError with a stack", err)
	}
	if strings.Contains(err.Error(), "goroutine") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("the error carries the stack: %q", err)
	}
	fr, err = b.LastFailure(ctx, "pkg")
	if err != nil || fr == nil || !fr.Panic || fr.Number != 2 || fr.Host != "host-b" {
		t.Fatalf("record after the panic = %+v, %v; want host-b, panic, number 2", fr, err)
	}
	if len(fr.Logs) != 1 || !strings.HasPrefix(filepath.Base(fr.Logs[0]), "panic-") {
		t.Fatalf("logs of the panicking attempt = %v, want one panic-*.log", fr.Logs)
	}
	if stack, _ := os.ReadFile(fr.Logs[0]); !strings.Contains(string(stack), "goroutine") {
		t.Fatalf("panic log has no stack: %q", stack)
	}
	if _, err := os.Stat(filepath.Join(b.Handle("pkg").LoggingDirectory(), "attempt-1.log")); err != nil {
		t.Fatalf("the first attempt's log did not survive the second attempt: %v", err)
	}

	// A third attempt keeps 2 logs: the previous one and its own.
	if err := b.Handle("pkg").Build(func() error {
		return os.WriteFile(filepath.Join(b.Handle("pkg").LoggingDirectory(), "attempt-3.log"), nil, 0o644)
	}); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(b.Handle("pkg").LoggingDirectory())
	if len(ents) != 2 || ents[0].Name() != "attempt-3.log" || !strings.HasPrefix(ents[1].Name(), "panic-") {
		t.Fatalf("logs after 3 attempts with WithKeptLogs(2): %v, want attempt-3.log and panic-*", ents)
	}

	ids, err := b.DropFailures(ctx, 0, false)
	if err != nil || len(ids) != 1 || ids[0] != "pkg" {
		t.Fatalf("DropFailures = %v, %v; want [pkg]", ids, err)
	}
	if fr, err := b.LastFailure(ctx, "pkg"); err != nil || fr != nil {
		t.Fatalf("LastFailure after DropFailures = %+v, %v; want none", fr, err)
	}
}

// otherExit reports another process's status than that of the
// *exec.ExitError it wraps, as internal/reaper's ExitError reports the
// builder's and wraps its guard's (which only exits with a code).
type otherExit struct {
	status syscall.WaitStatus
	guard  error
}

func (e *otherExit) Error() string { return "builder: " + e.guard.Error() }
func (e *otherExit) Unwrap() error { return e.guard }
func (e *otherExit) Sys() any      { return e.status }
func (e *otherExit) ExitCode() int {
	if e.status.Signaled() {
		return -1
	}
	return e.status.ExitStatus()
}

// TestFailureRecordsProcessStatus: the record keeps the first process
// status in the builder's error chain: an *exec.ExitError's code or
// signal, or the status of an error with the same ExitCode and Sys
// methods in front of one.
func TestFailureRecordsProcessStatus(t *testing.T) {
	srv := etcdtest.Start(t)
	s := newStore(t, srv, t.TempDir())
	ctx := context.Background()
	run := func(script string) error { return exec.Command("sh", "-c", script).Run() }
	var segv *exec.ExitError
	if !errors.As(run("ulimit -c 0; kill -SEGV $$"), &segv) {
		t.Fatal("sh did not die of SIGSEGV")
	}
	tests := []struct {
		id     string
		err    error
		code   int
		signal string
	}{
		{"exit", run("exit 42"), 42, ""},
		{"killed", run("kill -KILL $$"), -1, "killed"},
		{"other", &otherExit{status: segv.Sys().(syscall.WaitStatus), guard: run("exit 139")}, -1, "segmentation fault"},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			if err := s.Handle(tt.id).Build(func() error { return tt.err }); err == nil {
				t.Fatal("the build succeeded")
			}
			fr, err := s.LastFailure(ctx, tt.id)
			if err != nil || fr == nil {
				t.Fatalf("LastFailure = %v, %v", fr, err)
			}
			if fr.ExitCode == nil || *fr.ExitCode != tt.code || fr.Signal != tt.signal {
				code := "nil"
				if fr.ExitCode != nil {
					code = fmt.Sprint(*fr.ExitCode)
				}
				t.Errorf("record: exit code %s, signal %q; want %d, %q", code, fr.Signal, tt.code, tt.signal)
			}
		})
	}
}

// TestFailureRetention: etcd drops the record when the retention is over.
func TestFailureRetention(t *testing.T) {
	srv := etcdtest.Start(t)
	s := newStore(t, srv, t.TempDir(), etcdstore.WithFailureRetention(time.Second))
	s.Handle("pkg").Build(func() error { return errors.New("no") }) //nolint:errcheck // it fails on purpose
	fr, err := s.LastFailure(context.Background(), "pkg")
	if err != nil || fr == nil {
		t.Fatalf("LastFailure = %v, %v; want a record", fr, err)
	}
	cli := srv.Client(t)
	got, err := cli.Get(context.Background(), s.Prefix()+"failed/pkg")
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Kvs) == 0 {
		return // expired already
	}
	wch := cli.Watch(context.Background(), s.Prefix()+"failed/pkg", clientv3.WithRev(got.Header.Revision+1))
	select {
	case wr := <-wch:
		if len(wr.Events) != 1 || wr.Events[0].Type != 1 { // mvccpb.DELETE
			t.Fatalf("watch: %+v, want the record's deletion", wr.Events)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the record outlived its 1 s retention by 30 s")
	}
}

// TestSealingProgress: sealing reports how many files and bytes it sealed,
// and a last report with Done (the interval is shortened to 0 so that every
// file reports: no clock in the test).
func TestSealingProgress(t *testing.T) {
	defer etcdstore.SetSealProgressEvery(0)()
	srv := etcdtest.Start(t)
	ev := newEventLog()
	s := newStore(t, srv, t.TempDir(), etcdstore.WithEvents(ev.hook))
	h := s.Handle("tree")
	if err := h.Build(func() error {
		for i := range 3 {
			if err := os.WriteFile(filepath.Join(h.OutputDirectory(), fmt.Sprint(i)), []byte("12345"), 0o644); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n := ev.count(etcdstore.EventSealing, "tree"); n < 4 {
		t.Fatalf("%d sealing events, want at least 4 (3 files and the end)", n)
	}
	ev.mu.Lock()
	defer ev.mu.Unlock()
	var last etcdstore.Event
	for _, e := range ev.events {
		if e.Kind == etcdstore.EventSealing {
			last = e
		}
	}
	if !last.Done || last.Files != 3 || last.Size != 15 {
		t.Fatalf("last sealing event %+v, want Done with 3 files and 15 bytes", last)
	}
}

// TestPruneKeepsLogsOfRememberedFailure: the orphan sweep leaves a failed
// package's directory (its logs) alone while its failure record lives, and
// sweeps it once the record is dropped.
func TestPruneKeepsLogsOfRememberedFailure(t *testing.T) {
	srv := etcdtest.Start(t)
	ctx := context.Background()
	root := t.TempDir()
	a := newStore(t, srv, root)
	h := a.Handle("broken")
	h.Build(func() error { //nolint:errcheck // it fails on purpose
		os.WriteFile(filepath.Join(h.LoggingDirectory(), "build.log"), []byte("oops\n"), 0o644)
		return errors.New("oops")
	})
	log := filepath.Join(h.LoggingDirectory(), "build.log")
	a.Close() // the failed attempt's own record goes with its lease
	s := newStore(t, srv, root)
	if _, err := s.Prune(ctx, etcdstore.PruneOptions{OlderThan: time.Nanosecond, Grace: -1}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(log); err != nil {
		t.Fatalf("the log of a remembered failure was swept: %v", err)
	}
	if _, err := s.DropFailures(ctx, 0, false); err != nil {
		t.Fatal(err)
	}
	rep, err := s.Prune(ctx, etcdstore.PruneOptions{OlderThan: time.Nanosecond, Grace: -1})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Orphans) != 1 || rep.Orphans[0] != "broken" {
		t.Fatalf("orphans after the record was dropped: %v, want [broken]", rep.Orphans)
	}
}
