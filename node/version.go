package node

import (
	"runtime/debug"
)

// Version is this binary's version, reported in the node's registration
// and printed by 'granary version': the module version of a release
// ("v0.3.0"), else "devel" with the VCS revision when the go command
// recorded one ("devel-0123456789ab", "+modified" for a dirty work tree).
var Version = versionOf(debug.ReadBuildInfo())

// versionOf is Version from ReadBuildInfo's results.
func versionOf(bi *debug.BuildInfo, ok bool) string {
	if !ok {
		return "devel"
	}
	return VersionOf(bi)
}

// VersionOf is the version Version reports for build information bi.
func VersionOf(bi *debug.BuildInfo) string {
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "+modified"
			}
		}
	}
	if rev == "" {
		return "devel"
	}
	return "devel-" + rev[:min(len(rev), 12)] + dirty
}
