package etcdstore

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// MountInfo is what Granary knows of the file system that holds the root.
type MountInfo struct {
	MountPoint string   `json:"mount_point"`
	FSType     string   `json:"fs_type"`
	Source     string   `json:"source"`
	Options    []string `json:"options"` // per-mount and per-superblock options, as the kernel shows them
	// Warnings say what about this mount makes the host's view of the
	// shared root stale or unsafe, and what to change.
	Warnings []string `json:"warnings,omitempty"`
}

// CheckMount finds the mount that holds root in /proc/self/mountinfo and
// says what is wrong with it for a shared Granary root. It returns an
// error only if the mount table cannot be read (not Linux).
func CheckMount(root string, visibleTimeout time.Duration) (MountInfo, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return MountInfo{}, err
	}
	if r, err := filepath.EvalSymlinks(root); err == nil {
		root = r
	}
	mi, ok := findMount(string(b), root)
	if !ok {
		return MountInfo{}, fmt.Errorf("no mount holds %s in /proc/self/mountinfo", root)
	}
	mi.Warnings = mountWarnings(mi, visibleTimeout, sshfsOptions)
	return mi, nil
}

// checkMount logs and emits the warnings of the root's mount. It runs when
// the store opens.
func (s *Store) checkMount() {
	mi, err := CheckMount(s.root, s.opt.visibleTimeout)
	if err != nil {
		s.opt.logger.Debug("cannot check the root's mount", "err", err)
		return
	}
	s.mount = mi
	if mi.FSType == "fuse.sshfs" {
		if _, ok := sshfsOptions(mi.MountPoint); !ok {
			s.opt.logger.Info("the shared root is on sshfs whose process is not visible here: cannot check that it runs with -o dir_cache=no", "root", s.root)
		}
	}
	for _, w := range mi.Warnings {
		s.opt.logger.Warn("the shared root's mount options are not safe for Granary", "root", s.root, "mount", mi.MountPoint, "fs", mi.FSType, "warning", w)
		s.emit(Event{Kind: EventMountWarning, Err: fmt.Errorf("%s (%s on %s): %s", s.root, mi.FSType, mi.MountPoint, w)})
	}
}

// Mount returns what the store found, when it opened, about the mount that
// holds the root (empty where /proc/self/mountinfo is not available).
func (s *Store) Mount() MountInfo { return s.mount }

// fsTypeOf returns the type of the file system that holds path, or would
// hold it (path may not exist: its nearest existing ancestor decides), or
// "" if the mount table cannot be read.
func fsTypeOf(path string) string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return ""
	}
	for p := path; ; p = filepath.Dir(p) {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			path = filepath.Join(r, strings.TrimPrefix(path, p))
			break
		}
		if p == filepath.Dir(p) {
			break
		}
	}
	mi, _ := findMount(string(b), path)
	return mi.FSType
}

// localFS reports whether fstype is a local file system, whose lookups the
// kernel answers from a view no other host changes: there, a missing file
// is missing. On anything else (NFS, FUSE, CIFS, cluster file systems, an
// unknown type) a lookup may answer from a cache that another host's
// change has not reached yet.
func localFS(fstype string) bool {
	switch fstype {
	case "ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "bcachefs", "jfs", "reiserfs",
		"tmpfs", "ramfs", "overlay", "vfat", "exfat", "rootfs":
		return true
	}
	return false
}

// findMount returns the entry of mountinfo whose mount point is the longest
// prefix of path (the last such entry, as later mounts hide earlier ones).
func findMount(mountinfo, path string) (MountInfo, bool) {
	var best MountInfo
	found := false
	for line := range strings.SplitSeq(mountinfo, "\n") {
		// ID parent major:minor root mountpoint options [optional...] - fstype source superoptions
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 6 || len(g) < 2 {
			continue
		}
		mp := unescapeMount(f[4])
		if !within(path, mp) || (found && len(mp) < len(best.MountPoint)) {
			continue
		}
		opts := strings.Split(f[5], ",")
		if len(g) >= 3 {
			opts = append(opts, strings.Split(g[2], ",")...)
		}
		best = MountInfo{MountPoint: mp, FSType: g[0], Source: unescapeMount(g[1]), Options: opts}
		found = true
	}
	return best, found
}

func within(path, dir string) bool {
	return dir == "/" || path == dir || strings.HasPrefix(path, dir+"/")
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// nfsDefaultAcdirmax is the Linux NFS client's default acdirmax; the kernel
// shows acdirmax in mountinfo only when it differs.
const nfsDefaultAcdirmax = 60 * time.Second

// mountWarnings says what is wrong with mi for a shared root. sshfsOpts
// finds the -o options of the sshfs process serving a mount point (they
// are not in the mount table).
func mountWarnings(mi MountInfo, visibleTimeout time.Duration, sshfsOpts func(mountPoint string) ([]string, bool)) []string {
	var w []string
	opt := func(name string) (string, bool) {
		for _, o := range mi.Options {
			k, v, _ := strings.Cut(o, "=")
			if k == name {
				return v, true
			}
		}
		return "", false
	}
	switch {
	case mi.FSType == "nfs" || mi.FSType == "nfs4":
		acdirmax := nfsDefaultAcdirmax
		if v, ok := opt("acdirmax"); ok {
			if n, err := strconv.Atoi(v); err == nil {
				acdirmax = time.Duration(n) * time.Second
			}
		}
		if lc, ok := opt("lookupcache"); !ok || lc == "all" {
			msg := fmt.Sprintf("lookupcache=all (the default): a host that looked a package up before it was published may not see it for up to acdirmax (%v); "+
				"Granary revalidates and waits up to %v for it, but mount with lookupcache=positive", acdirmax, visibleTimeout)
			if acdirmax > visibleTimeout {
				msg += fmt.Sprintf(" (or acdirmax at most %v): as it is, a published package can stay invisible longer than Granary waits", visibleTimeout)
			}
			w = append(w, msg)
		}
		if _, ok := opt("nocto"); ok {
			w = append(w, "nocto: opening a file or directory does not revalidate it, so this host may read stale package trees and Granary's revalidation does nothing; remove nocto")
		}
		if _, ok := opt("soft"); ok {
			w = append(w, "soft: a slow server turns into I/O errors that can lose a builder's writes and fail readers; mount with hard (the default)")
		} else if _, ok := opt("softerr"); ok {
			w = append(w, "softerr: a slow server turns into I/O errors that can lose a builder's writes and fail readers; mount with hard (the default)")
		}
	case mi.FSType == "fuse.sshfs":
		opts, ok := sshfsOpts(mi.MountPoint)
		if !ok {
			// Its process is elsewhere (a container's mount made on the
			// host): nothing to say for sure, so no warning on every
			// command; checkMount logs it.
			break
		}
		dirCache := true
		for _, o := range opts {
			if o == "dir_cache=no" || o == "cache=no" {
				dirCache = false
			}
		}
		if dirCache {
			w = append(w, "sshfs with its listing cache on (dir_cache=yes, the default): listings are kept for 20 s and opening a directory does not revalidate them, "+
				"so this host sees stale package trees (empty, or the old names after a rebuild); mount with -o dir_cache=no,direct_io")
		}
	}
	return w
}

// sshfsOptions finds the sshfs process that serves mountPoint, from
// /proc/*/cmdline, and returns its -o options.
func sshfsOptions(mountPoint string) ([]string, bool) {
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return nil, false
	}
	for _, p := range procs {
		if _, err := strconv.Atoi(p.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + p.Name() + "/cmdline")
		if err != nil || len(b) == 0 {
			continue
		}
		args := strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
		if filepath.Base(args[0]) != "sshfs" {
			continue
		}
		var opts []string
		serves := false
		for i, a := range args[1:] {
			switch {
			case a == "-o" && i+2 < len(args):
				opts = append(opts, strings.Split(args[i+2], ",")...)
			case strings.HasPrefix(a, "-o") && len(a) > 2:
				opts = append(opts, strings.Split(a[2:], ",")...)
			case a == mountPoint || strings.TrimRight(a, "/") == mountPoint:
				serves = true
			}
		}
		if serves {
			return opts, true
		}
	}
	return nil, false
}
