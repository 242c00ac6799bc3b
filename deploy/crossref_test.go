package deploy

import (
	"fmt"
	"path"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	storagev1 "k8s.io/api/storage/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

func TestCSIDriverAgreesWithDaemonSetAndJob(t *testing.T) {
	o := load(t)
	drv, ds, job := o.drivers[0], o.daemons[0], o.jobs[0]
	if !slices.Equal(drv.Spec.VolumeLifecycleModes, []storagev1.VolumeLifecycleMode{storagev1.VolumeLifecycleEphemeral}) {
		t.Errorf("CSIDriver volumeLifecycleModes %v, want [Ephemeral]", drv.Spec.VolumeLifecycleModes)
	}
	if drv.Spec.PodInfoOnMount == nil || !*drv.Spec.PodInfoOnMount {
		t.Error("CSIDriver podInfoOnMount is not true: pods would not be recorded as holders")
	}
	if drv.Spec.AttachRequired == nil || *drv.Spec.AttachRequired {
		t.Error("CSIDriver attachRequired must be false: there is no Controller service")
	}
	pod := ds.Spec.Template.Spec
	checkPod(t, o, "DaemonSet", ds.Spec.Selector, ds.Spec.Template)
	g := container(t, pod, "granary")
	reg := container(t, pod, "node-driver-registrar")
	if g.Args[0] != "serve" {
		t.Errorf("granary container args %v: want serve first", g.Args)
	}
	if got := flagValue(g.Args, "csi-driver-name"); got != drv.Name {
		t.Errorf("--csi-driver-name %q, CSIDriver %q", got, drv.Name)
	}
	if !strings.HasPrefix(reg.Image, "registry.k8s.io/sig-storage/csi-node-driver-registrar:") {
		t.Errorf("registrar image %q", reg.Image)
	}
	// The plugin's socket: the same file seen by granary, the registrar
	// and kubelet (through the host path).
	endpoint := strings.TrimPrefix(flagValue(g.Args, "csi-endpoint"), "unix://")
	addr := flagValue(reg.Args, "csi-address")
	gm, rm := mountOf(t, g, "socket-dir"), mountOf(t, reg, "socket-dir")
	if path.Dir(endpoint) != gm.MountPath || path.Dir(addr) != rm.MountPath || path.Base(endpoint) != path.Base(addr) {
		t.Errorf("socket: granary serves %s (socket-dir at %s), the registrar dials %s (socket-dir at %s)", endpoint, gm.MountPath, addr, rm.MountPath)
	}
	hostSock := path.Join(volumeOf(t, pod, "socket-dir").HostPath.Path, path.Base(endpoint))
	if got := flagValue(reg.Args, "kubelet-registration-path"); got != hostSock {
		t.Errorf("--kubelet-registration-path %q, the socket on the host is %q", got, hostSock)
	}
	if want := "/var/lib/kubelet/plugins/" + drv.Name; path.Dir(hostSock) != want {
		t.Errorf("socket directory on the host %s, want kubelet's %s", path.Dir(hostSock), want)
	}
	if v := volumeOf(t, pod, "registration-dir"); v.HostPath.Path != "/var/lib/kubelet/plugins_registry" || mountOf(t, reg, "registration-dir").MountPath != "/registration" {
		t.Errorf("registration dir: host %s", v.HostPath.Path)
	}
	kd := mountOf(t, g, "kubelet-dir")
	if kd.MountPropagation == nil || *kd.MountPropagation != corev1.MountPropagationBidirectional || kd.MountPath != volumeOf(t, pod, "kubelet-dir").HostPath.Path {
		t.Errorf("kubelet dir mount %+v: want the host's path, Bidirectional", kd)
	}
	if g.SecurityContext == nil || g.SecurityContext.Privileged == nil || !*g.SecurityContext.Privileged {
		t.Error("the granary container must be privileged to mount (Bidirectional propagation requires it)")
	}
	if v := volumeOf(t, pod, "package-root"); v.NFS == nil || mountOf(t, g, "package-root").MountPath != flagValue(g.Args, "root") {
		t.Errorf("package root: want an NFS volume mounted at --root %s", flagValue(g.Args, "root"))
	}
	if st := volumeOf(t, pod, "state-dir"); st.HostPath == nil || mountOf(t, g, "state-dir").MountPath != flagValue(g.Args, "state-dir") {
		t.Errorf("state dir: want a host path mounted at --state-dir %s", flagValue(g.Args, "state-dir"))
	}
	// Liveness from the node's /healthz on its --listen-metrics port.
	port := g.Ports[0]
	if !strings.HasSuffix(flagValue(g.Args, "listen-metrics"), fmt.Sprintf(":%d", port.ContainerPort)) {
		t.Errorf("--listen-metrics %q, container port %d", flagValue(g.Args, "listen-metrics"), port.ContainerPort)
	}
	if lp := g.LivenessProbe; lp == nil || lp.HTTPGet == nil || lp.HTTPGet.Path != "/healthz" || lp.HTTPGet.Port.String() != port.Name {
		t.Errorf("liveness probe %+v: want GET /healthz on port %q", lp, port.Name)
	}

	// The example job mounts a package through the driver, and the
	// node's agent socket directory for granary-run.
	checkPod(t, o, "Job", job.Spec.Selector, job.Spec.Template)
	var csiVols int
	for _, v := range job.Spec.Template.Spec.Volumes {
		switch {
		case v.CSI != nil:
			csiVols++
			if v.CSI.Driver != drv.Name || v.CSI.VolumeAttributes["package"] == "" || v.CSI.ReadOnly == nil || !*v.CSI.ReadOnly {
				t.Errorf("job volume %s: driver %q attributes %v: want driver %q, a package, read-only", v.Name, v.CSI.Driver, v.CSI.VolumeAttributes, drv.Name)
			}
		case v.HostPath != nil && v.HostPath.Path != volumeOf(t, pod, "state-dir").HostPath.Path:
			t.Errorf("job volume %s: host path %s is not the node's state directory (its agent socket)", v.Name, v.HostPath.Path)
		}
	}
	if csiVols == 0 {
		t.Error("the example job mounts no package")
	}
	if o.k.Images[0].Name != g.Image {
		t.Errorf("kustomization sets image %q, the DaemonSet uses %q", o.k.Images[0].Name, g.Image)
	}
}

func TestEtcdAgreesWithNodes(t *testing.T) {
	o := load(t)
	set, svc, pdb := o.sets[0], o.services[0], o.pdbs[0]
	var claims []string
	for _, c := range set.Spec.VolumeClaimTemplates {
		claims = append(claims, c.Name)
	}
	checkPod(t, o, "StatefulSet", set.Spec.Selector, set.Spec.Template, claims...)
	if set.Spec.Replicas == nil || *set.Spec.Replicas != 3 {
		t.Errorf("etcd replicas %v, want 3", set.Spec.Replicas)
	}
	if set.Spec.ServiceName != svc.Name || svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Errorf("StatefulSet serviceName %q, Service %q clusterIP %q: want the headless Service", set.Spec.ServiceName, svc.Name, svc.Spec.ClusterIP)
	}
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(set.Spec.Template.Labels)) {
		t.Errorf("Service selector %v does not match the etcd pods %v", svc.Spec.Selector, set.Spec.Template.Labels)
	}
	pdbSel, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
	if err != nil || !pdbSel.Matches(labels.Set(set.Spec.Template.Labels)) {
		t.Errorf("PodDisruptionBudget selector does not match the etcd pods (%v)", err)
	}
	if pdb.Spec.MinAvailable == nil || pdb.Spec.MinAvailable.IntValue() != 2 {
		t.Errorf("PodDisruptionBudget minAvailable %v, want 2 (a quorum of 3)", pdb.Spec.MinAvailable)
	}
	etcd := set.Spec.Template.Spec.Containers[0]
	ports := map[string]int32{}
	for _, p := range etcd.Ports {
		ports[p.Name] = p.ContainerPort
	}
	for _, p := range svc.Spec.Ports {
		if ports[p.TargetPort.String()] != p.Port {
			t.Errorf("Service port %s %d → %s, container has %v", p.Name, p.Port, p.TargetPort.String(), ports)
		}
	}
	ns := set.Namespace
	var want, members []string
	for i := range int(*set.Spec.Replicas) {
		host := fmt.Sprintf("%s-%d.%s.%s.svc", set.Name, i, svc.Name, ns)
		want = append(want, fmt.Sprintf("http://%s:%d", host, ports["client"]))
		members = append(members, fmt.Sprintf("%s-%d=http://%s:%d", set.Name, i, host, ports["peer"]))
	}
	if got := flagValue(etcd.Command, "initial-cluster"); got != strings.Join(members, ",") {
		t.Errorf("--initial-cluster %q, want %q", got, strings.Join(members, ","))
	}
	g := container(t, o.daemons[0].Spec.Template.Spec, "granary")
	if got := flagValue(g.Args, "endpoints"); got != strings.Join(want, ",") {
		t.Errorf("node --endpoints %q, want the etcd members %q", got, strings.Join(want, ","))
	}
	for _, obj := range []string{set.Namespace, svc.Namespace, pdb.Namespace, o.daemons[0].Namespace, o.jobs[0].Namespace} {
		if obj != o.k.Namespace {
			t.Errorf("object in namespace %q, the kustomization's is %q", obj, o.k.Namespace)
		}
	}
}
