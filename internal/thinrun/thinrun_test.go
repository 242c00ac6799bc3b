package thinrun

import (
	"errors"
	"path/filepath"
	"slices"
	"testing"

	"github.com/granary-build/granary/internal/paths"
)

func TestParse(t *testing.T) {
	t.Setenv("HOME", "/home/u")
	t.Setenv("XDG_DATA_HOME", "")
	t.Setenv("XDG_STATE_HOME", "")
	cwd, _ := filepath.Abs(".")
	tests := []struct {
		name     string
		args     []string
		env      map[string]string
		want     config // zero when the full binary must do the job
		fallback bool
	}{
		{name: "defaults", args: []string{"pkg", "--", "true"},
			want: config{root: "/home/u/.local/share/granary", stateDir: "/home/u/.local/state/granary", prefix: paths.DefaultPrefix, id: "pkg", argv: []string{"true"}}},
		{name: "environment", args: []string{"pkg", "--", "sh", "-c", "x"},
			env:  map[string]string{"GRANARY_ROOT": "/r", "GRANARY_STATE_DIR": "/s", "GRANARY_PREFIX": "/p/", "GRANARY_ENDPOINTS": "e:1"},
			want: config{root: "/r", stateDir: "/s", prefix: "/p/", id: "pkg", argv: []string{"sh", "-c", "x"}}},
		{name: "flags override the environment, anywhere before --", args: []string{"pkg", "--root", "rel", "-state-dir=/s2", "--", "true", "--root", "x"},
			env:  map[string]string{"GRANARY_ROOT": "/r", "GRANARY_STATE_DIR": "/s"},
			want: config{root: filepath.Join(cwd, "rel"), stateDir: "/s2", prefix: paths.DefaultPrefix, id: "pkg", argv: []string{"true", "--root", "x"}}},
		{name: "agent off", args: []string{"pkg", "--", "true"}, env: map[string]string{"GRANARY_AGENT": "off"}, fallback: true},
		{name: "unknown flag", args: []string{"--ttl", "10", "pkg", "--", "true"}, fallback: true},
		{name: "help", args: []string{"-h"}, fallback: true},
		{name: "no --", args: []string{"pkg", "true"}, fallback: true},
		{name: "no command", args: []string{"pkg", "--"}, fallback: true},
		{name: "no ID", args: []string{"--", "true"}, fallback: true},
		{name: "two IDs", args: []string{"a", "b", "--", "true"}, fallback: true},
		{name: "invalid ID", args: []string{"a/../b", "--", "true"}, fallback: true},
		{name: "relative state dir", args: []string{"--state-dir", "st", "pkg", "--", "true"}, fallback: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parse(tt.args, func(k string) string { return tt.env[k] })
			var fb *fallback
			if tt.fallback {
				if !errors.As(err, &fb) {
					t.Fatalf("parse = %+v, %v; want a fallback to the full binary", got, err)
				}
				return
			}
			if err != nil {
				t.Fatalf("parse: %v", err)
			}
			if got.root != tt.want.root || got.stateDir != tt.want.stateDir || got.prefix != tt.want.prefix || got.id != tt.want.id || !slices.Equal(got.argv, tt.want.argv) {
				t.Errorf("parse = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// Without a full binary next to this one or in $PATH, the error says so.
func TestFindFullMissing(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	_, err := FindFull()
	if !errors.Is(err, ErrNoFull) {
		t.Fatalf("FindFull = %v, want ErrNoFull", err)
	}
	err = execFull([]string{"pkg", "--", "true"}, "no local node")
	if code := Exit(err, testWriter{t}); code != 1 {
		t.Errorf("exit code %d, want 1", code)
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }
