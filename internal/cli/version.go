package cli

import (
	"context"
	"fmt"
	"runtime/debug"
	"strings"

	"github.com/granary-build/granary/node"
)

// Version describes this binary from its build information: the module
// version ("(devel)" for a build from a work tree), the VCS revision and
// time when the go command recorded them, and the Go version.
func Version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "granary (no build information)"
	}
	return versionOf(bi)
}

func versionOf(bi *debug.BuildInfo) string {
	mod := bi.Main.Version
	if mod == "" {
		mod = "(unknown)"
	}
	var rev, at, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.time":
			at = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "+modified"
			}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "granary %s", mod)
	if rev != "" {
		fmt.Fprintf(&b, " rev %s%s", rev, dirty)
		if at != "" {
			fmt.Fprintf(&b, " (%s)", at)
		}
	} else {
		b.WriteString(" rev unknown (built without VCS information)")
	}
	fmt.Fprintf(&b, ", node version %s, %s", node.Version, bi.GoVersion)
	return b.String()
}

func cmdVersion(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 {
		return usageErr("version", "unexpected argument %q", args[0])
	}
	fmt.Fprintln(e.stdout, Version())
	return nil
}
