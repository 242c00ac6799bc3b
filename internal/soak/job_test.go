package soak

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestJobChecks holds the soak's job to what TestFarmSoak relies on: an
// intact package passes, a changed, missing or foreign one is reported as
// a violation, unless the launcher stops the job (SIGTERM) after it saw
// the mismatch, which is reported as excused; an ID meant to fail fails.
// Without it, a soak with 0 violations could mean a checker that sees
// nothing.
func TestJobChecks(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "soakjob")
	if out, err := exec.Command("go", "build", "-o", bin, "./testdata/soakjob").CombinedOutput(); err != nil {
		t.Fatalf("go build soakjob: %v\n%s", err, out)
	}
	// job runs soakjob with the environment granary gives it and
	// returns its exit code and stderr.
	job := func(t *testing.T, env []string, args ...string) (int, string) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), env...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		err := cmd.Run()
		var xe *exec.ExitError
		if err != nil && !errors.As(err, &xe) {
			t.Fatal(err)
		}
		return cmd.ProcessState.ExitCode(), stderr.String()
	}

	if code, stderr := job(t, []string{"GRANARY_OUT=" + t.TempDir()}, "build", "doomed", "fail"); code != 7 {
		t.Errorf("build of an ID meant to fail: exit %d, want 7 (%s)", code, stderr)
	}

	tests := []struct {
		name   string
		id     string // the ID the job is run for
		mutate func(pkg string) error
		stop   bool // the launcher stops the job after its mismatch
		want   string
	}{
		{name: "intact", id: "p"},
		{name: "file changed", id: "p", mutate: func(pkg string) error {
			return os.WriteFile(filepath.Join(pkg, "f0"), []byte("other"), 0o644)
		}, want: "violation"},
		{name: "file gone", id: "p", mutate: func(pkg string) error {
			return os.Remove(filepath.Join(pkg, "lib", "f1"))
		}, want: "violation"},
		{name: "package gone", id: "p", mutate: os.RemoveAll, want: "violation"},
		{name: "another package", id: "q", want: "violation"},
		{name: "package gone, job stopped", id: "p", mutate: os.RemoveAll, stop: true, want: "excused"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pkg, reports := t.TempDir(), t.TempDir()
			if code, stderr := job(t, []string{"GRANARY_OUT=" + pkg}, "build", "p"); code != 0 {
				t.Fatalf("build: exit %d: %s", code, stderr)
			}
			if code, stderr := job(t, []string{"GRANARY_PKG=" + pkg}, "verify", "p"); code != 0 {
				t.Fatalf("verify of the package just built: exit %d: %s", code, stderr)
			}
			if tt.mutate != nil {
				if err := tt.mutate(pkg); err != nil {
					t.Fatal(err)
				}
			}
			env := []string{"GRANARY_PKG=" + pkg, envJobReports + "=" + reports, envJobExcuseWait + "=100ms"}
			var code int
			if tt.stop {
				env[2] = envJobExcuseWait + "=1h" // only the SIGTERM ends it
				code = stopAfterMismatch(t, bin, env, "check", tt.id)
			} else {
				code, _ = job(t, env, "check", tt.id)
			}
			got, _ := filepath.Glob(filepath.Join(reports, "*"))
			switch {
			case tt.want == "" && (code != 0 || len(got) > 0):
				t.Errorf("exit %d, reports %v; want 0 and none", code, got)
			case tt.want != "" && (len(got) != 1 || !strings.HasPrefix(filepath.Base(got[0]), tt.want+"-")):
				t.Errorf("reports %v; want one %q report", got, tt.want)
			case tt.want != "" && code == 0:
				t.Errorf("exit 0 after a failed check")
			}
		})
	}
}

// stopAfterMismatch runs soakjob with args, waits for its MISMATCH line
// and sends it SIGTERM, as granary-run does to a job whose reference was
// lost; it returns the exit code.
func stopAfterMismatch(t *testing.T, bin string, env []string, args ...string) int {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stderr)
	for sc.Scan() && !strings.Contains(sc.Text(), "soakjob: MISMATCH") {
	}
	cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // waited for below
	for sc.Scan() {
	}
	cmd.Wait() //nolint:errcheck // the exit code is the result
	return cmd.ProcessState.ExitCode()
}
