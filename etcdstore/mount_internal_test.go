package etcdstore

import (
	"strings"
	"testing"
	"time"
)

// Lines as the Linux kernel writes them in /proc/self/mountinfo.
const sampleMountinfo = `22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
40 22 0:35 / /mnt/granary rw,relatime shared:20 - nfs4 filer:/export/granary rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.5,local_lock=none,addr=10.0.0.2
41 22 0:36 / /mnt/good rw,relatime - nfs4 filer:/export/good rw,vers=4.2,hard,lookupcache=pos,acdirmax=30,proto=tcp
42 22 0:37 / /mnt/bad rw,relatime - nfs filer:/export/bad rw,vers=3,soft,nocto,acdirmax=120,proto=tcp
43 22 0:38 / /mnt/with\040space rw - fuse.sshfs nfs:/export rw,user_id=0,group_id=0
`

func TestMountWarnings(t *testing.T) {
	noSSHFS := func(string) ([]string, bool) { return nil, false }
	sshfs := func(opts ...string) func(string) ([]string, bool) {
		return func(string) ([]string, bool) { return opts, true }
	}
	tests := []struct {
		name   string
		root   string
		sshfs  func(string) ([]string, bool)
		mp, fs string
		want   []string // substrings, one per warning, in order
	}{
		{"local disk", "/var/lib/granary", noSSHFS, "/", "ext4", nil},
		{"nfs defaults", "/mnt/granary/root", noSSHFS, "/mnt/granary", "nfs4", []string{"lookupcache=all"}},
		{"nfs as recommended", "/mnt/good", noSSHFS, "/mnt/good", "nfs4", nil},
		{"nfs soft nocto long acdirmax", "/mnt/bad/x", noSSHFS, "/mnt/bad", "nfs", []string{"longer than Granary waits", "nocto", "soft"}},
		{"sshfs default mode", "/mnt/with space/r", sshfs("reconnect"), "/mnt/with space", "fuse.sshfs", []string{"dir_cache=yes"}},
		{"sshfs nfs-like", "/mnt/with space/r", sshfs("dir_cache=no", "direct_io"), "/mnt/with space", "fuse.sshfs", nil},
		{"sshfs elsewhere (a container's host mount)", "/mnt/with space", noSSHFS, "/mnt/with space", "fuse.sshfs", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			mi, ok := findMount(sampleMountinfo, tt.root)
			if !ok || mi.MountPoint != tt.mp || mi.FSType != tt.fs {
				t.Fatalf("findMount(%q) = %+v, %v; want %s %s", tt.root, mi, ok, tt.mp, tt.fs)
			}
			w := mountWarnings(mi, 60*time.Second, tt.sshfs)
			if len(w) != len(tt.want) {
				t.Fatalf("warnings = %q, want %d matching %q", w, len(tt.want), tt.want)
			}
			for i := range w {
				if !strings.Contains(w[i], tt.want[i]) {
					t.Errorf("warning %d = %q, want it to mention %q", i, w[i], tt.want[i])
				}
			}
		})
	}
}
