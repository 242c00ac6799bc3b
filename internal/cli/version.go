package cli

import (
	"context"
	"fmt"
	"runtime/debug"
	"strings"

	"github.com/granary-build/granary/node"
)

// Version describes this binary in one line: its version (node.Version,
// the one nodes register and status shows), then the VCS revision and time
// when the go command recorded them, and the Go version.
func Version() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "granary " + node.Version + " (no build information)"
	}
	return versionOf(bi)
}

func versionOf(bi *debug.BuildInfo) string {
	var rev, at string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.time":
			at = s.Value
		}
	}
	details := []string{}
	if rev != "" {
		details = append(details, "rev "+rev)
	} else {
		details = append(details, "built without VCS information")
	}
	if at != "" {
		details = append(details, at)
	}
	details = append(details, bi.GoVersion)
	return fmt.Sprintf("granary %s (%s)", node.VersionOf(bi), strings.Join(details, ", "))
}

func cmdVersion(ctx context.Context, e *env, args []string) error {
	if len(args) > 0 {
		return usageErr("version", "unexpected argument %q", args[0])
	}
	fmt.Fprintln(e.stdout, Version())
	return nil
}
