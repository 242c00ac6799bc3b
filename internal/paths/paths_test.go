package paths

import (
	"flag"
	"testing"
)

func TestResolve(t *testing.T) {
	tests := []struct {
		name                   string
		xdgData, xdgState      string
		env                    map[string]string
		args                   []string
		root, stateDir, prefix string
	}{
		{name: "home", root: "/home/u/.local/share/granary", stateDir: "/home/u/.local/state/granary", prefix: DefaultPrefix},
		{name: "XDG", xdgData: "/d", xdgState: "/s", root: "/d/granary", stateDir: "/s/granary", prefix: DefaultPrefix},
		{name: "relative XDG is ignored", xdgData: "d", xdgState: "s", root: "/home/u/.local/share/granary", stateDir: "/home/u/.local/state/granary", prefix: DefaultPrefix},
		{name: "environment", env: map[string]string{EnvRoot: "/r", EnvStateDir: "/st", EnvPrefix: "/p/"}, root: "/r", stateDir: "/st", prefix: "/p/"},
		{name: "flags over environment", env: map[string]string{EnvRoot: "/r", EnvPrefix: "/p/"},
			args: []string{"--root", "/f", "-state-dir=/g"}, root: "/f", stateDir: "/g", prefix: "/p/"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("HOME", "/home/u")
			t.Setenv("XDG_DATA_HOME", tt.xdgData)
			t.Setenv("XDG_STATE_HOME", tt.xdgState)
			root, state, prefix := DefaultRoot(), DefaultStateDir(), DefaultPrefix
			p := Places{Root: &root, StateDir: &state, Prefix: &prefix}
			p.FromEnv(func(k string) string { return tt.env[k] })
			fs := flag.NewFlagSet("t", flag.ContinueOnError)
			p.RegisterFlags(fs)
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			if root != tt.root || state != tt.stateDir || prefix != tt.prefix {
				t.Errorf("got root %q state %q prefix %q, want %q %q %q", root, state, prefix, tt.root, tt.stateDir, tt.prefix)
			}
		})
	}
}
