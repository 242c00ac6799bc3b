// Package paths resolves where a host's Granary lives: the shared package
// root, the host-local state directory and the etcd key prefix, from their
// defaults, the GRANARY_* environment and the command line. It is the one
// copy of that resolution: node.Config (the full CLI and the node) and the
// light job launcher cmd/granary-run both use it, so they always agree on
// which node serves a command. It imports only the standard library.
package paths

import (
	"flag"
	"os"
	"path/filepath"
)

// Environment variables that name the three places.
const (
	EnvRoot     = "GRANARY_ROOT"
	EnvStateDir = "GRANARY_STATE_DIR"
	EnvPrefix   = "GRANARY_PREFIX"
)

// DefaultPrefix is the default etcd key prefix (etcdstore.DefaultPrefix).
const DefaultPrefix = "/granary/"

// DefaultRoot is the default shared root: $XDG_DATA_HOME/granary if that
// is an absolute path, else ~/.local/share/granary; "" without a home
// directory (node.Config.Validate reports it).
func DefaultRoot() string { return xdgDir("XDG_DATA_HOME", ".local/share") }

// DefaultStateDir is the default state directory: $XDG_STATE_HOME/granary
// if that is an absolute path, else ~/.local/state/granary; "" without a
// home directory.
func DefaultStateDir() string { return xdgDir("XDG_STATE_HOME", ".local/state") }

func xdgDir(env, fallback string) string {
	if d := os.Getenv(env); d != "" && filepath.IsAbs(d) {
		return filepath.Join(d, "granary")
	}
	home, err := os.UserHomeDir()
	if err != nil || home == "" {
		return ""
	}
	return filepath.Join(home, fallback, "granary")
}

// Places are the three places a command is configured with.
type Places struct {
	Root, StateDir, Prefix *string
}

// FromEnv sets each place whose GRANARY_* variable getenv returns
// non-empty.
func (p Places) FromEnv(getenv func(string) string) {
	for _, v := range []struct {
		dst  *string
		name string
	}{{p.Root, EnvRoot}, {p.StateDir, EnvStateDir}, {p.Prefix, EnvPrefix}} {
		if s := getenv(v.name); s != "" {
			*v.dst = s
		}
	}
}

// RegisterFlags binds --root, --state-dir and --prefix to the places; their
// defaults are the places' current values, so call it after FromEnv.
func (p Places) RegisterFlags(fs *flag.FlagSet) {
	fs.StringVar(p.Root, "root", *p.Root, "shared package root ($"+EnvRoot+")")
	fs.StringVar(p.StateDir, "state-dir", *p.StateDir, "host-local state directory ($"+EnvStateDir+")")
	fs.StringVar(p.Prefix, "prefix", *p.Prefix, "etcd key prefix ($"+EnvPrefix+")")
}

// The shared root's layout, written here once (the light agent client,
// which imports only the standard library and core, repeats the two
// package paths; agent's tests hold them equal):
//
//	<root>/pkgs/<id>/contents   the package's tree (OutputDirectory)
//	<root>/pkgs/<id>/logs       its builds' logs (LoggingDirectory)
//	<root>/.trash/              removed trees, deleted in the background

// Pkgs is the directory of every package under root.
func Pkgs(root string) string { return filepath.Join(root, "pkgs") }

// PkgDir is the directory of package id under root.
func PkgDir(root, id string) string { return filepath.Join(root, "pkgs", id) }

// Contents is the contents directory of package id under root, $GRANARY_PKG
// of a job.
func Contents(root, id string) string { return filepath.Join(PkgDir(root, id), "contents") }

// Logs is the logging directory of package id under root.
func Logs(root, id string) string { return filepath.Join(PkgDir(root, id), "logs") }

// Trash is where removed trees wait for deletion.
func Trash(root string) string { return filepath.Join(root, ".trash") }
