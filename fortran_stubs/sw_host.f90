!> 2-D rotating shallow-water host model coupled to lodas (dynamics in sw_dynamics.f90).
!>
!> Usage: mpiexec -n A sw_host FILE.nml : -n B python -m coupler run FILE.nml
!> Reads &sw_nml (its own group; the same keys as bridges/namelist.py SwNml); the bridge reads
!> &bridge_nml. Slab decomposition in y: rank r of A owns all nx columns and rows
!> j0+1 .. j0+ny/A (j0 = r*ny/A) of u, v and h, with sw_nh = 2 halo rows on each side.
!> Every grid point is computed with the same operations whatever A, so any A that divides ny
!> (at least 2 rows per rank) gives bit-identical results, equal to coupler/models/shallow_water.py.
!>
!> Per analysis cycle: steps_per_cycle RK4 steps of dt_s, then the background (u, v, h) goes to
!> lodas and the analysis increment comes back. It is added at once (increment_mode = 'direct')
!> or spread over the first iau_steps steps of the next cycle with constant weights (IAU).
!> A failed cycle (status /= 0) leaves the state as it is unless &bridge_nml on_failure = 'abort'.
program sw_host
   use mpi
   use lodas_bridge
   use host_utils, only: state_file_io, host_stop, host_log
   use sw_dynamics
   implicit none

   integer, parameter :: dp = lodas_dp
   type(sw_params) :: p
   ! &sw_nml; defaults are the sw_params defaults (set below, before the read)
   integer :: nx, ny, forcing_wavenumber, steps_per_cycle = 24, n_cycles = 40
   real(dp) :: lx_m, ly_m, dt_s, f0, g, h0_m, viscosity, drag, forcing_amp
   character(len=512) :: init_file = '', final_file = ''
   namelist /sw_nml/ nx, ny, lx_m, ly_m, dt_s, f0, g, h0_m, viscosity, drag, forcing_amp, &
      forcing_wavenumber, steps_per_cycle, n_cycles, init_file, final_file

   type(lodas_ctx) :: ctx
   integer :: comm, rank, nranks, ierr, status, nyl, j0, step, cycle, k, iau_k, unit, ios, n3, st
   integer :: starts(2, 3), counts(2, 3)
   real(dp), allocatable :: u(:, :), v(:, :), h(:, :), buf(:), inc(:)
   character(len=512) :: nml_file, iomsg
   character(len=LODAS_MSG_LEN) :: msg

   call MPI_Init(ierr)
   call get_command_argument(1, nml_file)
   call lodas_init(ctx, trim(nml_file), MPI_COMM_WORLD, comm, status, msg)
   if (status /= LODAS_OK) call host_stop(ctx, 0, msg)
   call MPI_Comm_rank(comm, rank, ierr)
   call MPI_Comm_size(comm, nranks, ierr)

   nx = p%nx; ny = p%ny; lx_m = p%lx_m; ly_m = p%ly_m; dt_s = p%dt_s; f0 = p%f0; g = p%g
   h0_m = p%h0_m; viscosity = p%viscosity; drag = p%drag; forcing_amp = p%forcing_amp
   forcing_wavenumber = p%forcing_wavenumber
   open (newunit=unit, file=trim(nml_file), status='old', action='read', iostat=ios, iomsg=iomsg)
   if (ios == 0) read (unit, nml=sw_nml, iostat=ios, iomsg=iomsg)
   if (ios /= 0) call host_stop(ctx, rank, trim(nml_file)//': &sw_nml: '//trim(iomsg))
   close (unit)
   p = sw_params(nx=nx, ny=ny, lx_m=lx_m, ly_m=ly_m, dt_s=dt_s, f0=f0, g=g, h0_m=h0_m, &
                 viscosity=viscosity, drag=drag, forcing_amp=forcing_amp, &
                 forcing_wavenumber=forcing_wavenumber)

   call sw_decomposition(p, comm, rank, nranks, nyl, j0, st)
   if (st /= 0) then
      write (msg, '(a,i0,a,i0,a,i0,a)') '&sw_nml ny = ', ny, ' cannot be split over ', nranks, &
         ' host ranks: ny must be a multiple of the ranks, with at least ', sw_nh, ' rows each'
      call host_stop(ctx, rank, msg)
   end if
   if (trim(ctx%increment_mode) == 'iau' .and. ctx%iau_steps > steps_per_cycle) then
      write (msg, '(a,i0,a,i0,a)') '&bridge_nml iau_steps = ', ctx%iau_steps, &
         ' exceeds &sw_nml steps_per_cycle = ', steps_per_cycle, ': the IAU window must end before the next analysis'
      call host_stop(ctx, rank, msg)
   end if
   do k = 1, 3
      starts(:, k) = [1, j0 + 1]
      counts(:, k) = [nx, nyl]
   end do
   call lodas_define_decomposition(ctx, 'sw', ['u', 'v', 'h'], nx, ny, starts, counts, status, msg)
   if (status /= LODAS_OK) call host_stop(ctx, rank, msg)

   n3 = nx*nyl
   allocate (u(nx, 1 - sw_nh:nyl + sw_nh), v(nx, 1 - sw_nh:nyl + sw_nh), h(nx, 1 - sw_nh:nyl + sw_nh))
   allocate (buf(3*n3), inc(3*n3))
   u = 0.0_dp; v = 0.0_dp; h = 0.0_dp
   if (len_trim(init_file) > 0) then
      call state_file_io(comm, trim(init_file), .false., nx, ny, starts, counts, buf, ios, msg)
      if (ios /= 0) call host_stop(ctx, rank, '&sw_nml init_file: '//msg)
      call unpack(buf)
   else
      call sw_default_initial_state(p, j0, nyl, u(:, 1:nyl), v(:, 1:nyl), h(:, 1:nyl))
   end if

   step = 0
   iau_k = huge(1)
   inc = 0.0_dp
   do cycle = 1, n_cycles
      do k = 1, steps_per_cycle
         call sw_step(p, comm, u, v, h)
         step = step + 1
         if (iau_k < ctx%iau_steps) then        ! forward IAU: constant weight over the window
            iau_k = iau_k + 1
            call add_increment(lodas_iau_weight(ctx, iau_k))
         end if
      end do
      call pack(buf)
      call lodas_put_background(ctx, buf, step, step*dt_s, status, msg)
      if (status == LODAS_OK) call lodas_get_increment(ctx, inc, status, msg)
      if (status /= LODAS_OK) then
         call host_log(rank, 'sw_host: '//msg)
         if (trim(ctx%on_failure) == 'abort') call lodas_fail(ctx, msg)
         inc = 0.0_dp
      else if (trim(ctx%increment_mode) == 'direct') then
         call add_increment(1.0_dp)
      else
         iau_k = 0
      end if
   end do

   if (len_trim(final_file) > 0) then
      call pack(buf)
      call state_file_io(comm, trim(final_file), .true., nx, ny, starts, counts, buf, ios, msg)
      if (ios /= 0) call host_log(rank, 'sw_host: &sw_nml final_file: '//msg)
   end if
   call lodas_finalize(ctx, status, msg)
   if (status /= LODAS_OK) call host_log(rank, 'sw_host: '//msg)
   call MPI_Comm_free(comm, ierr)
   call MPI_Finalize(ierr)

contains

   !> Owned rows of u, v, h -> the bridge's buffer layout: variable by variable, x fastest.
   subroutine pack(b)
      real(dp), intent(out) :: b(:)
      b(1:n3) = reshape(u(:, 1:nyl), [n3])
      b(n3 + 1:2*n3) = reshape(v(:, 1:nyl), [n3])
      b(2*n3 + 1:3*n3) = reshape(h(:, 1:nyl), [n3])
   end subroutine pack

   !> The bridge's buffer layout -> owned rows of u, v, h.
   subroutine unpack(b)
      real(dp), intent(in) :: b(:)
      u(:, 1:nyl) = reshape(b(1:n3), [nx, nyl])
      v(:, 1:nyl) = reshape(b(n3 + 1:2*n3), [nx, nyl])
      h(:, 1:nyl) = reshape(b(2*n3 + 1:3*n3), [nx, nyl])
   end subroutine unpack

   !> state <- state + w * increment on the owned rows (w = 1: direct; IAU weight otherwise).
   subroutine add_increment(w)
      real(dp), intent(in) :: w
      u(:, 1:nyl) = u(:, 1:nyl) + w*reshape(inc(1:n3), [nx, nyl])
      v(:, 1:nyl) = v(:, 1:nyl) + w*reshape(inc(n3 + 1:2*n3), [nx, nyl])
      h(:, 1:nyl) = h(:, 1:nyl) + w*reshape(inc(2*n3 + 1:3*n3), [nx, nyl])
   end subroutine add_increment

end program sw_host
